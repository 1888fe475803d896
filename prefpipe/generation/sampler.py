"""The generator seam: a backend samples completions from exact prompt ids and returns the ids it produced.

A generator implements `generate(prompt_ids, seed) -> list[list[(completion_ids, finish_reason)]]` (one list of
`num_samples` completions per prompt, in input order) and, if it holds anything, `close`. It never decodes and
re-encodes: what it returns is what the model produced, cut just after the first stop id (finish "stop") or at
`max_new_tokens` (finish "length"). `provenance()` is what the output's manifest records about it.
"""

from __future__ import annotations

from prefpipe.generation.config import SamplingSettings

Completion = tuple[list[int], str]


def cut_at_stop(ids: list[int], stop_ids: set[int], max_new_tokens: int) -> Completion:
    """`ids` (a generated continuation, possibly padded after it stopped) cut just after its first stop id."""
    for i, t in enumerate(ids):
        if t in stop_ids:
            return list(ids[:i + 1]), "stop"
    return list(ids[:max_new_tokens]), "length"


def stop_token_ids(tokenizer, generation_eos=None) -> set[int]:
    """EOS, the model's generation-config EOS ids, and the chat template's end-of-turn token: the first special
    token the template writes after an assistant's text (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`)."""
    stops = set()
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    for e in ([generation_eos] if isinstance(generation_eos, int) else generation_eos or []):
        stops.add(int(e))
    if getattr(tokenizer, "chat_template", None):
        marker = "zq7xv"
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": marker}], tokenize=False)
        except Exception:  # noqa: BLE001 - a template that needs more than this; EOS alone then
            text = ""
        tail = text[text.find(marker) + len(marker):] if marker in text else ""
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        for t in tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []:
            if t in special:
                stops.add(t)
                break
    return stops


class Generator:
    """Base of the sampling backends (module docstring)."""
    name = ""

    def __init__(self, sampling: SamplingSettings):
        self.sampling = sampling

    def provenance(self) -> dict:
        return {"name": self.name}

    def generate(self, prompt_ids: list[list[int]], seed: int, progress=None) -> list[list[Completion]]:
        raise NotImplementedError

    def close(self):
        pass
