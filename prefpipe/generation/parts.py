"""One part of a generate run: its prompts sampled, judged and written (the local driver and each Ray actor run
this same function, so both write the same part)."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from prefpipe.generation import output
from prefpipe.generation.config import GenerateConfig
from prefpipe.generation.judges import make_judge
from prefpipe.generation.samples import Sample


def make_generate_judge(cfg: GenerateConfig):
    j = cfg.judge
    return make_judge(j.reward, gold_col=j.gold_col, reward_model=j.reward_model, device=cfg.device,
                      batch_size=j.reward_batch_size, chat_date=cfg.input.chat_date, dtype=cfg.dtype)


def part_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{index}".encode()).digest()[:4], "little")


def _samples_of(recs, pids, gens, counts: Counter, drop_truncated: bool, tok, first: int) -> list[Sample]:
    out = []
    for j, (rec, p_ids, completions) in enumerate(zip(recs, pids, gens)):
        for k, (ids, finish) in enumerate(completions):
            text = tok.decode(ids, skip_special_tokens=True)
            if not text.strip() and finish == "stop":
                counts["empty_completion"] += 1  # only a stop token: nothing to prefer or reject
                continue
            if finish == "length" and drop_truncated:
                counts["truncated_dropped"] += 1
                continue
            counts["truncated_kept" if finish == "length" else "stopped"] += 1
            out.append(Sample(first + j, rec.row_id, k, rec.prompt, list(p_ids), text, list(ids), finish,
                              rec.extra or {}))
    return out


def sample_part(cfg, generator, judge, tok, index: int, recs, pids, key: str, out: Path, progress=None) -> Counter:
    """Part `index` (prompt records `recs`, their ids `pids`): sampled, judged and written; its sample counts."""
    counts: Counter = Counter()
    gens = generator.generate(pids, part_seed(cfg.sampling.seed, index), progress=progress)
    samples = _samples_of(recs, pids, gens, counts, cfg.drop_truncated, tok, index * cfg.part_rows)
    judge.score(samples)
    output.write_part(out, index, samples, key, binary=judge.binary)
    return counts
