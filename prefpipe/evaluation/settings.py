"""`prefpipe eval`'s options, declared once (see prefpipe.options); the pipeline's `[eval]` table reads the same
`GenSettings` fields. Importing this module imports no torch."""

from __future__ import annotations

from dataclasses import dataclass

from prefpipe.data.tokenize import TokenizeSettings
from prefpipe.options import DTYPES, check_choices, opt, same_as

GEN_PROMPT_TEMPLATE = "Question: {question}\nAnswer: "
ENGINES = ("auto", "hf", "vllm")


@dataclass(frozen=True)
class EvalTargets:
    """What `prefpipe eval` evaluates and where results go."""
    model: str = opt(name="model", metavar="RUN", path=True, help="A run directory from `prefpipe train` (uses "
                     "RUN/final and its beta), RUN/final, or a model directory.")
    cache: str | None = opt(None, path=True, help="Held-out paired cache: implicit-reward accuracy and margin.")
    gen: str | None = opt(None, path=True, metavar="GSM8K_STYLE.jsonl",
                          help="Questions with GSM8K answers ('#### N'): greedy exact-match accuracy.")
    beta: float | None = opt(None, help="--cache with a model prefpipe did not train: the beta to use.",
                             default_text="the run's beta")
    out: str | None = opt(None, path=True, help="Directory for eval_pref.json / eval_gen.json(l); a plain model "
                          "directory is never written into.", default_text="RUN, or ./eval-<model dir name>")


@dataclass(frozen=True)
class GenSettings:
    """Maps one-to-one to `prefpipe eval --gen` options."""
    prompt_template: str = opt(GEN_PROMPT_TEMPLATE, escapes=True,
                                help="How a question becomes a prompt ({question}).")
    chat: bool = opt(False, help="Render each question as a user turn with the chat template instead.")
    chat_date: str = same_as(TokenizeSettings, "chat_date")
    max_new_tokens: int = opt(256, help="Generation budget per question.")
    batch_size: int = opt(64, help="Questions per generate() call; pairs per forward with --cache.")
    engine: str = opt("auto", choices=ENGINES,
                      help="auto: vLLM when it is installed and CUDA is present, else transformers.")
    limit: int | None = opt(None, help="Only the first N questions.")
    question_col: str = opt("question", help="Column holding the question.")
    answer_col: str = opt("answer", help="Column holding the GSM8K-style answer.")
    device: str = opt("auto", help="auto, cpu, cuda or cuda:N.")
    dtype: str = opt("auto", choices=DTYPES, help="auto: bf16 on GPUs that support it, float32 on CPU.")

    def __post_init__(self):
        check_choices(self)
