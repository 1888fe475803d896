"""`--reward model`: a sequence-classification reward model scores each prompt + completion.

- **Model.** ``AutoModelForSequenceClassification`` from `--reward_model` (a directory, or a cached hub id), with
  exactly one output (``num_labels == 1``), checked from its config before sampling. It runs in float32 on CPU
  and in bf16 on a GPU that has it (`dtype="auto"`), batched.
- **Text.** The reward model reads the conversation in its own format, not the policy's: the prompt's messages (a
  text prompt is one user message) and the completion as the assistant's message, rendered by the reward model's
  tokenizer's chat template with the run's `chat_date` (as `prefpipe.data.tokenize` renders data). A tokenizer
  with no chat template reads prompt text + completion text (a conversational prompt is then refused). The
  text is tokenized with BOS once (`PairTokenizer.encode_prompts`).
- **Score.** The score head's output at the last token of each sequence. Batches are right-padded and the last
  token is found from the attention mask, not by looking for the pad id: a pad id that is also a real token (pad =
  EOS, and a completion that ends with EOS) would make transformers' own pooling read the wrong position.
  Sequences are batched longest first, and each batch's scores are stored as soon as it is done.
"""

from __future__ import annotations

from pathlib import Path

from prefpipe.data.fingerprint import model_fingerprint
from prefpipe.data.tokenize import DEFAULT_CHAT_DATE, PairTokenizer, TokenizeSettings
from prefpipe.errors import UserError
from prefpipe.generation.judge import Judge, sample_label
from prefpipe.generation.samples import Sample
from prefpipe.model_paths import model_ref
from prefpipe.tokenizer import load_tokenizer


class RewardModelJudge(Judge):
    binary = False

    def __init__(self, model: str, *, device: str = "cpu", batch_size: int = 16,
                 chat_date: str = DEFAULT_CHAT_DATE, dtype: str = "auto"):
        if batch_size < 1:
            raise UserError(f"the reward model's batch size must be >= 1 (got {batch_size})")
        self.settings = TokenizeSettings(chat_date=chat_date)  # a bad date fails here, before anything loads
        ref = model_ref(str(model))  # one line for a mistyped path, before any hub call
        self.path = str(Path(ref).resolve()) if Path(ref).is_dir() else ref
        self.name = f"model:{self.path}"
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self._model = self._encoder = None
        self._fingerprint = None

    @property
    def fingerprint(self) -> str:
        """sha256 of the reward model's config and weights (`prefpipe.data.fingerprint`), for provenance."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.path)
        return self._fingerprint

    def check_rows(self, rows: list[dict], where: str) -> None:
        self._config()

    def _config(self):
        from transformers import AutoConfig
        try:
            config = AutoConfig.from_pretrained(self.path)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the reward model's config ({str(e).splitlines()[0]})", file=self.path)
        if config.num_labels != 1:
            raise UserError(f"a reward model has one output; this one has {config.num_labels} (num_labels in its "
                            f"config.json)", file=self.path)
        return config

    def _load(self):
        import torch
        from transformers import AutoModelForSequenceClassification

        from prefpipe.modeling import resolve_device, resolve_dtype
        config = self._config()
        device = resolve_device(self.device)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                self.path, config=config, dtype=resolve_dtype(self.dtype, device))
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot load the reward model ({str(e).splitlines()[0]})", file=self.path)
        if not isinstance(getattr(model, "score", None), torch.nn.Module):
            raise UserError(f"this reward model ({type(model).__name__}) has no per-token `score` head; prefpipe "
                            f"reads the score at the last token, as decoder reward models "
                            f"(LlamaForSequenceClassification and the like) give it", file=self.path)
        tok = load_tokenizer(self.path)
        text_config = model.config.get_text_config()
        if text_config.pad_token_id is None:
            # Only transformers' own pooling reads it (and refuses batches without one); its result is not used.
            text_config.pad_token_id = tok.pad_token_id
        self._encoder = PairTokenizer(tok, self.settings)
        self._pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self._max_positions = getattr(text_config, "max_position_embeddings", None)
        self._model = model.to(device).eval()
        self._logits = {}
        model.score.register_forward_hook(lambda module, args, out: self._logits.__setitem__("out", out))

    def close(self) -> None:
        self._model = self._encoder = None

    def _text(self, s: Sample) -> str:
        tok = self._encoder.tok
        if getattr(tok, "chat_template", None):
            messages = [{"role": "user", "content": s.prompt}] if isinstance(s.prompt, str) else list(s.prompt)
            messages.append({"role": "assistant", "content": s.completion})
            try:
                return tok.apply_chat_template(messages, tokenize=False, **self._encoder.template_kwargs)
            except Exception as e:  # noqa: BLE001 - the model's Jinja code on the user's messages
                msg = " ".join(str(e).split()) or type(e).__name__
                raise UserError(f"the reward model's chat template failed on {sample_label(s)}: {msg}",
                                file=self.path) from None
        if not isinstance(s.prompt, str):
            raise UserError(f"{sample_label(s)}: the prompt is a conversation, and the reward model's tokenizer has "
                            f"no chat template to render it", file=self.path)
        return s.prompt + s.completion

    def _ids(self, samples: list[Sample]) -> list[list[int]]:
        ids = self._encoder.encode_prompts([self._text(s) for s in samples])
        for s, seq in zip(samples, ids):
            if not seq or (self._max_positions and len(seq) > self._max_positions):
                raise UserError(f"{sample_label(s)} is {len(seq)} tokens for the reward model, which reads 1 to "
                                f"{self._max_positions} (max_position_embeddings)", file=self.path)
        return ids

    def score(self, samples: list[Sample]) -> None:
        if not samples:
            return
        if self._model is None:
            self._load()
        ids = self._ids(samples)
        order = sorted(range(len(samples)), key=lambda i: -len(ids[i]))  # longest first: out of memory at once
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            for i, value in zip(batch, self._forward([ids[i] for i in batch])):
                samples[i].reward = value

    def _forward(self, seqs: list[list[int]]) -> list[float]:
        """Scores [n] of n sequences: right-padded to [n, T], the head's [n, T, 1] output read at each last token
        (attention-mask length - 1)."""
        import torch

        device = next(self._model.parameters()).device
        n, width = len(seqs), max(len(s) for s in seqs)
        ids = torch.full((n, width), self._pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for r, seq in enumerate(seqs):
            ids[r, :len(seq)] = torch.tensor(seq)
            mask[r, :len(seq)] = 1
        with torch.inference_mode():
            self._model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        per_token = self._logits.pop("out")
        last = (mask.sum(dim=1) - 1).to(device)
        return per_token[torch.arange(n, device=device), last, 0].float().tolist()
