"""`prefpipe generate --engine ray`: the parts sampled as a Ray Data plan over a pool of Ray actors, each holding
one generator and one judge (docs/ray.md).

The driver does what it does for the local engine: it reads and checks the prompts, renders their ids, plans the
parts, skips the finished ones and, at the end, builds the pairs and the KTO view and writes the manifest. The plan
is one row per part still to sample (its prompt records and ids, which the driver already holds: prompts are small
next to their samples); sampling, judging and writing a part happen on the actors, with the same per-part seed, so
the output equals the local engine's on the same machine and backend. Each actor writes its part atomically into
`--out`, which must therefore be a directory every node sees; a python judge's module is imported in the driver's
working directory, which the actors enter (on other nodes, the same path must hold it). Faults as for
precompute's engine (`prefpipe.ray_cluster`): a dead actor is restarted and its part sampled again; an actor that
cannot load, or a part that fails, stops the run in one line naming the part; finished parts stay, and the same
command resumes.
"""

from __future__ import annotations

import os
import pickle
from collections import Counter
from dataclasses import replace
from pathlib import Path

from prefpipe.generation.generators import make_generator
from prefpipe.generation.parts import make_generate_judge, sample_part
from prefpipe.model_paths import resolve_model_dir
from prefpipe.ray_cluster import (RESTARTS, Ledger, check_out, connect, gpus_per_actor, import_ray, quiet_data,
                                  run_parts, then)
from prefpipe.tokenizer import load_tokenizer


class Sampler:
    """One Ray actor: a generator and a judge loaded once; a part's prompts -> its samples judged and written."""

    def __init__(self, cfg, cwd: str, key: str, out: str, ledger):
        if os.path.isdir(cwd):
            os.chdir(cwd)  # where the driver found a python judge's module
        self.cfg, self.key, self.out, self.ledger = cfg, key, Path(out), ledger
        self.tok = load_tokenizer(str(resolve_model_dir(cfg.model)))
        self.judge = make_generate_judge(cfg)
        self.judge.check_rows([], "")  # a python judge imports its module now, not on the first part
        self.generator = make_generator(cfg.backend, cfg, self.tok)

    def __call__(self, batch: dict) -> dict:
        return then(batch, self._sample, self.ledger)

    def _sample(self, index: int, value: tuple) -> tuple:
        recs, pids = value
        counts = sample_part(self.cfg, self.generator, self.judge, self.tok, index, recs, pids, self.key, self.out)
        return dict(counts), len(recs)


def sample_on_ray(cfg, records, prompt_ids, todo, key: str, out: Path, bar) -> Counter:
    """Every part in `todo`, spread over the actors; the summed sample counts."""
    check_out(cfg)
    ray = import_ray()
    connected = connect(ray, cfg)
    counts, n = Counter(), cfg.part_rows
    try:
        gpus = gpus_per_actor(ray.cluster_resources(), cfg.device, cfg.ray_workers)
        model = Path(cfg.model)
        actor_cfg = replace(cfg, device="cuda" if gpus else "cpu",
                            model=str(model.resolve()) if model.exists() else cfg.model)
        quiet_data(ray)
        ledger = ray.remote(Ledger).options(num_cpus=0).remote()
        # Each row as a stage's answer (ok, value), so the sampling stage reads it as it reads any stage's.
        items = [{"index": i, "blob": pickle.dumps((True, (records[i * n:(i + 1) * n],
                                                          prompt_ids[i * n:(i + 1) * n])))} for i in todo]
        plan = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            Sampler, batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(cfg.ray_workers, len(items))), num_cpus=1,
            num_gpus=gpus, max_restarts=RESTARTS, max_task_retries=RESTARTS,
            fn_constructor_args=(actor_cfg, os.getcwd(), key, str(out.resolve()), ledger))

        def finished(_index, value):
            part_counts, n_prompts = value
            counts.update(part_counts)
            bar.update(n_prompts)
        run_parts(ray, plan, ledger, finished)
    finally:
        if connected:
            ray.shutdown()
    return counts
