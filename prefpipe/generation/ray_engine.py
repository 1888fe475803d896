"""`prefpipe generate --engine ray`: the parts sampled on a pool of Ray actors, each holding one generator and one
judge (docs/ray.md).

The driver does what it does for the local engine: it reads and checks the prompts, renders their ids, plans the
parts, skips the finished ones and, at the end, builds the pairs and the KTO view and writes the manifest. Only
sampling, judging and writing a part move to the actors, with the same per-part seed, so the output equals the
local engine's on the same machine and backend. Each actor writes its part atomically into `--out`, which must
therefore be a directory every node sees; a python judge's module is imported in the driver's working directory,
which the actors enter (on other nodes, the same path must hold it). Faults as for precompute's engine: a dead
actor is restarted and its part sampled again; an actor that cannot load, or a part that fails, stops the run in
one line naming the part; finished parts stay, and the same command resumes.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from dataclasses import replace
from pathlib import Path

from prefpipe.errors import UserError
from prefpipe.precompute.ray_engine import RESTARTS, connect, import_ray, one_line

QUEUED = 2  # parts sent to each actor ahead of time


class Sampler:
    """One Ray actor: a generator and a judge loaded once, sampling, judging and writing whole parts."""

    def __init__(self, cfg, cwd: str):
        from prefpipe.generation.generators import make_generator
        from prefpipe.generation.parts import make_generate_judge
        from prefpipe.model_paths import resolve_model_dir
        from prefpipe.tokenizer import load_tokenizer

        if os.path.isdir(cwd):
            os.chdir(cwd)  # where the driver found a python judge's module
        self.cfg = cfg
        self.tok = load_tokenizer(str(resolve_model_dir(cfg.model)))
        self.judge = make_generate_judge(cfg)
        self.judge.check_rows([], "")  # a python judge imports its module now, not on the first part
        self.generator = make_generator(cfg.backend, cfg, self.tok)

    def where(self) -> str:
        return f"{socket.gethostname()} pid {os.getpid()}"

    def sample_part(self, index: int, recs: list, pids: list, key: str, out: str) -> dict:
        from prefpipe.generation.parts import sample_part
        return dict(sample_part(self.cfg, self.generator, self.judge, self.tok, index, recs, pids, key, Path(out)))


def _gpus(cfg, cluster: dict) -> float:
    have = cluster.get("GPU", 0)
    wants = cfg.device != "cpu" and (cfg.device != "auto" or have > 0)
    if wants and cfg.ray_workers > have:
        raise UserError(f"--engine ray: {cfg.ray_workers} actor(s) x 1 GPU (--device {cfg.device}) need "
                        f"{cfg.ray_workers} GPUs; the Ray cluster has {have:g}")
    return 1 if wants else 0


def _start(ray, cfg) -> tuple[list, list]:
    gpus = _gpus(cfg, ray.cluster_resources())
    model = Path(cfg.model)
    actor_cfg = replace(cfg, device="cuda" if gpus else "cpu",
                        model=str(model.resolve()) if model.exists() else cfg.model)
    remote = ray.remote(Sampler).options(num_cpus=1, num_gpus=gpus, max_restarts=RESTARTS,
                                         max_task_retries=RESTARTS)
    actors = [remote.remote(actor_cfg, os.getcwd()) for _ in range(cfg.ray_workers)]
    where = []
    for i, a in enumerate(actors):
        try:
            where.append(ray.get(a.where.remote()))
        except Exception as e:  # noqa: BLE001 - Ray wraps the actor's error in several types
            raise UserError(f"--engine ray: actor {i} could not load the model or judge: {one_line(e)}")
    return actors, where


def sample_on_ray(cfg, records, prompt_ids, todo, key: str, out: Path, bar) -> Counter:
    """Every part in `todo`, spread over the actors; the summed sample counts."""
    if cfg.ray_address and not Path(cfg.out).is_absolute():
        raise UserError("--out must be an absolute path when joining a Ray cluster (--ray_address): every node "
                        "writes its parts there", file=str(cfg.out))
    ray = import_ray()
    connected = not ray.is_initialized()
    if connected:
        connect(ray, cfg)
    actors, counts, n = [], Counter(), cfg.part_rows
    try:
        actors, where = _start(ray, cfg)
        queued, flight = [0] * len(actors), {}
        for index in todo:
            while len(flight) >= QUEUED * len(actors):
                counts.update(_next_done(ray, flight, queued, where, bar))
            i = min(range(len(actors)), key=queued.__getitem__)
            queued[i] += 1
            ref = actors[i].sample_part.remote(index, records[index * n:(index + 1) * n],
                                               prompt_ids[index * n:(index + 1) * n], key, str(out.resolve()))
            flight[ref] = (index, i, len(records[index * n:(index + 1) * n]))
        while flight:
            counts.update(_next_done(ray, flight, queued, where, bar))
    finally:
        for a in actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if connected:
            ray.shutdown()
    return counts


def _next_done(ray, flight: dict, queued: list, where: list, bar) -> dict:
    ready, _ = ray.wait(list(flight), num_returns=1)
    index, i, n_prompts = flight.pop(ready[0])
    queued[i] -= 1
    try:
        got = ray.get(ready[0])
    except Exception as e:  # noqa: BLE001
        cause = getattr(e, "cause", None)
        if isinstance(cause, UserError):
            raise UserError(f"part {index} (actor {i}): {cause.format()}")
        raise UserError(f"part {index} failed on actor {i} ({where[i]}): {one_line(e)}")
    bar.update(n_prompts)
    return got
