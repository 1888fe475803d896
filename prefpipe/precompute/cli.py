"""CLI for phase one: `prefpipe precompute` and `prefpipe inspect`."""

from __future__ import annotations

import click

from prefpipe.data.options import columns_from, data_options, tokenize_options
from prefpipe.precompute.backend import BackendOptions


@click.command()
@click.option("--model", required=True, help="Frozen SFT model directory (or hub id): the reference.")
@click.option("--data", "data_path", required=True, help="Preference data: a file, a directory or a glob.")
@click.option("--out", required=True, help="Cache directory to write (parts + manifest.json).")
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True,
              help="Scoring engine.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="auto: bf16 on GPUs that support it, float32 on CPU.")
@click.option("--device", default="auto", show_default=True, help="hf: auto, cpu, cuda or cuda:N.")
@tokenize_options
@click.option("--batch_tokens", type=int, default=BackendOptions.batch_tokens, show_default=True,
              help="hf: padded tokens per forward (length-sorted batches).")
@click.option("--kto", is_flag=True, help="Write a KTO cache from paired data (two examples per pair). "
              "Unpaired data (a label column) always gives a KTO cache.")
@click.option("--no_reference", is_flag=True, help="Tokenize only, no scoring (an ORPO cache).")
@click.option("--part_rows", type=int, default=4096, show_default=True,
              help="Input rows per cache part (the unit of resume and sharding).")
@data_options
@click.option("--tensor_parallel_size", type=int, default=BackendOptions.tensor_parallel_size,
              show_default=True, help="vllm: GPUs per engine.")
@click.option("--gpu_memory_utilization", type=float, default=BackendOptions.gpu_memory_utilization,
              show_default=True, help="vllm: fraction of GPU memory the engine may take.")
@click.option("--max_model_len", type=int, default=None, help="vllm: engine context length [default: --max_length].")
@click.option("--chunk_rows", type=int, default=BackendOptions.chunk_rows, show_default=True,
              help="vllm: requests per engine call (bounds prompt-logprob memory).")
@click.option("--shard", default=None, metavar="I/N",
              help="Independent process I of N: score only parts with index % N == I. The process that finds "
                   "every part present writes the manifest.")
@click.option("--verify", type=int, default=0, metavar="K",
              help="After writing, rescore K random rows with a plain transformers forward and compare.")
@click.option("--overwrite", is_flag=True,
              help="Delete the cache parts and manifest already in --out first (needed when they come from a "
                   "different run).")
@click.option("--no_progress", is_flag=True, help="No progress bar.")
def precompute(model, data_path, out, backend, dtype, device, max_length, max_prompt_length, batch_tokens, kto,
               no_reference, part_rows, turn_marker, tensor_parallel_size, gpu_memory_utilization, max_model_len,
               chunk_rows, shard, verify, overwrite, no_progress, **cols):
    """Phase one: score every example with the frozen SFT model into a Parquet cache.

    Rerunning the same command after an interruption continues from the finished parts. Under
    `torchrun --nproc_per_node=N` each rank scores its share of the parts and rank 0 writes the manifest.
    """
    from prefpipe.precompute.run import PrecomputeConfig, run_precompute
    from prefpipe.precompute.summary import format_summary

    cfg = PrecomputeConfig(
        model=model, data=data_path, out=out, backend=backend, dtype=dtype, device=device, max_length=max_length,
        max_prompt_length=max_prompt_length, batch_tokens=batch_tokens, kto=kto, no_reference=no_reference,
        part_rows=part_rows, columns=columns_from(cols), turn_marker=turn_marker,
        tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len, chunk_rows=chunk_rows, shard=shard, verify=verify, overwrite=overwrite,
        progress=not no_progress)
    summary = run_precompute(cfg)
    if summary.get("leader", True):
        for line in format_summary(summary):
            click.echo(line)


@click.command("inspect")
@click.argument("cache")
def inspect_cmd(cache):
    """Print a cache's provenance and column statistics (validates every part on the way)."""
    from prefpipe.data.cache import read_cache
    from prefpipe.precompute.summary import inspect_lines

    for line in inspect_lines(read_cache(cache)):
        click.echo(line)
