"""`prefpipe generate`'s driver: read and check the prompts and the judge's columns before any model loads, then
sample part by part (each part judged and written atomically, so a rerun resumes), then build the pairs and the
KTO view from every part and write the manifest last."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from prefpipe.data.fingerprint import model_fingerprint, tokenizer_fingerprint
from prefpipe.data.generated import KIND
from prefpipe.data.tokenize import PairTokenizer
from prefpipe.errors import UserError
from prefpipe.fileio import OutputLock
from prefpipe.generation import output
from prefpipe.generation.config import GenerateConfig
from prefpipe.generation.generators import make_generator
from prefpipe.generation.parts import make_generate_judge, sample_part
from prefpipe.generation.ray_engine import sample_on_ray
from prefpipe.generation.pairs import PairCounts, build_pairs, default_rule, kto_rows
from prefpipe.generation.samples import Sample
from prefpipe.model_paths import resolve_model_dir
from prefpipe.progress_bar import progress_bar
from prefpipe.tokenizer import load_tokenizer, quiet_transformers

FORMAT_VERSION = 1


def read_prompts(cfg: GenerateConfig, judge) -> tuple:
    """The prompts' dataset and every prompt record, checked (shape, and what the judge reads) before a model is
    loaded."""
    ds = cfg.input.dataset(cfg.data, prompts_only=True, batch_rows=cfg.part_rows).validate()
    records = [rec for batch in ds.batches() for rec in batch]
    if not records:
        raise UserError("no prompts to sample from", file=str(cfg.data))
    by_source: dict[str, list] = {}
    for rec in records:
        by_source.setdefault(rec.source, []).append(rec.extra)
    for source, rows in by_source.items():
        judge.check_rows(rows, source)
    return ds, records


def sampling_dtype(cfg: GenerateConfig) -> str:
    """The dtype the generator will sample in (`auto` resolved as the backend resolves it), known before loading."""
    import torch

    from prefpipe.modeling import resolve_device, resolve_dtype
    if cfg.backend == "vllm":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = resolve_device("cuda" if cfg.engine == "ray" and cfg.device == "auto" and torch.cuda.is_available()
                                else cfg.device)
    return str(resolve_dtype(cfg.dtype, device)).removeprefix("torch.")


def run_key(cfg: GenerateConfig, fingerprints: dict, data_fp: str, judge_name: str) -> str:
    """What a sample part depends on: a part written under another key belongs to another run (the dtype as
    resolved: `auto` on a GPU and on a CPU sample differently)."""
    ident = {"version": FORMAT_VERSION, **fingerprints, "data": data_fp, "sampling": asdict(cfg.sampling),
             "tokenize": cfg.input.tokenize_settings().metadata(), "columns": asdict(cfg.input.columns),
             "backend": cfg.backend, "dtype": sampling_dtype(cfg), "judge": judge_name,
             "drop_truncated": cfg.drop_truncated, "part_rows": cfg.part_rows}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def _sample_parts(cfg, records, prompt_ids, todo, key, out, tok, counts, judge) -> dict:
    """Sample, judge and write the parts `todo`; the generator's provenance (engine, version, resolved dtype)."""
    n = cfg.part_rows
    total = sum(len(records[i * n:(i + 1) * n]) for i in todo)
    with progress_bar(total, f"generate: sampling x {cfg.sampling.num_samples}", "prompt",
                      show=cfg.progress) as bar:
        if cfg.engine == "ray":
            counts.update(sample_on_ray(cfg, records, prompt_ids, todo, key, out, bar))
            return {"name": cfg.backend, "engine": "ray", "actors": cfg.ray_workers}
        generator = make_generator(cfg.backend, cfg, tok)
        engine = generator.provenance()
        try:
            for i in todo:
                counts.update(sample_part(cfg, generator, judge, tok, i, records[i * n:(i + 1) * n],
                                          prompt_ids[i * n:(i + 1) * n], key, out, progress=bar.update))
        finally:
            generator.close()
            judge.close()
    return engine


def _build_views(cfg: GenerateConfig, out: Path, n_parts: int):
    by_prompt: dict[int, list[Sample]] = {}
    binary = True  # 0/1 rewards: every part's judge said so (a python judge knows once it has returned values)
    for i in range(n_parts):
        samples, part_binary = output.read_part(output.part_path(out, i))
        binary &= part_binary
        for s in samples:
            by_prompt.setdefault(s.prompt_index, []).append(s)
    rule = default_rule(binary) if cfg.judge.pairs == "auto" else cfg.judge.pairs
    counts, pairs, kto = PairCounts(), [], []
    for idx in sorted(by_prompt):
        found, reason = build_pairs(by_prompt[idx], rule=rule, pairs_per_prompt=cfg.judge.pairs_per_prompt,
                                    min_margin=cfg.judge.min_margin)
        counts.add(found, reason)
        pairs += found
        kto += kto_rows(by_prompt[idx], binary=binary, threshold=cfg.judge.kto_threshold)
    rewards = [s.reward for ss in by_prompt.values() for s in ss]
    return rule, pairs, kto, counts, rewards, binary


def run_generate(cfg: GenerateConfig) -> dict:
    t0 = time.time()
    quiet_transformers()
    judge = make_generate_judge(cfg)
    ds, records = read_prompts(cfg, judge)
    model_dir = str(resolve_model_dir(cfg.model))
    tok = load_tokenizer(model_dir)
    pt = PairTokenizer(tok, cfg.input.tokenize_settings())
    prompt_ids = pt.prompt_ids(records)
    empty = [r for r, ids in zip(records, prompt_ids) if not ids]
    if empty:
        raise UserError("this prompt has no tokens at all (an empty text and a tokenizer without BOS)",
                        file=empty[0].source, row=empty[0].row, column=cfg.input.columns.prompt)
    fps = {"model": model_fingerprint(cfg.model), "tokenizer": tokenizer_fingerprint(tok)}
    data_fp = ds.fingerprint()
    key = run_key(cfg, fps, data_fp, judge.name)
    out = Path(cfg.out)
    n_parts = -(-len(records) // cfg.part_rows)
    counts: Counter = Counter()
    with OutputLock(out, "--out"):
        done = output.finished_parts(out, key, n_parts, cfg.overwrite)
        todo = [i for i in range(n_parts) if i not in done]
        # What sampled the parts of this process (none when every part was reused)
        engine = _sample_parts(cfg, records, prompt_ids, todo, key, out, tok, counts, judge) if todo else None
        rule, pairs, kto, pair_counts, rewards, binary = _build_views(cfg, out, n_parts)
        output.write_views(out, pairs, kto, key)
        summary = {"prompts": len(records), "parts": n_parts, "parts_reused": len(done),
                   "samples": len(rewards), "sample_counts": dict(counts), "pair_rule": rule,
                   "pairs": len(pairs), "kto_rows": len(kto), "prompt_outcomes": pair_counts.to_dict(),
                   "mean_reward": sum(rewards) / len(rewards) if rewards else None,
                   "seconds": round(time.time() - t0, 2)}
        manifest = {"kind": KIND, "version": FORMAT_VERSION, "key": key, "created": time.time(),
                    "generator": {"path": cfg.model, "fingerprint": fps["model"], "tokenizer": fps["tokenizer"],
                                  "backend": cfg.backend, "dtype": cfg.dtype, "engine": engine},
                    "sampling": asdict(cfg.sampling), "judge": {"name": judge.name, "binary": binary,
                                                                **asdict(cfg.judge)},
                    "input": {"data": str(cfg.data), "fingerprint": data_fp,
                              "tokenize": cfg.input.tokenize_settings().metadata()},
                    "drop_truncated": cfg.drop_truncated, "summary": summary}
        output.write_manifest(out, manifest)
    return summary
