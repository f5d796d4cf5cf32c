"""`edgeslim generate`: a causal LM's text from its key/value-cache graph in ONNX Runtime, streamed, with tokens/s."""
from __future__ import annotations

import click

from edgeslim.cli_options import console, json_option, print_json, source_options, trust_of, trust_options


@click.command()
@click.argument("item")
@click.option("--prompt", required=True, help="the text to continue (wrapped in the model's chat template when it has one)")
@click.option("-n", "--new-tokens", "n", default=64, show_default=True, type=int, help="most tokens to generate")
@click.option("--greedy", is_flag=True, help="always the most likely token (the default unless --temperature)")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="sample at this temperature (0: greedy)")
@click.option("--seed", default=0, show_default=True, help="random seed for sampling")
@click.option("--raw", is_flag=True, help="the prompt as given, without the chat template")
@click.option("--threads", type=int, help="ONNX Runtime intra-op threads (default: ORT's choice)")
@json_option
@source_options
@trust_options
def generate(item: str, prompt: str, n: int, greedy: bool, temperature: float, seed: int, raw: bool,
             threads: int | None, as_json: bool, weights: str | None, inputs: str | None, task: str | None,
             trusted: str | None, trust_source: bool) -> None:
    """Generate text with a causal LM (SOURCE, OUT.slim or a --kv-cache .onnx) through its key/value cache in
    ONNX Runtime; prints tokens/s. An .onnx file runs without torch; anything else is exported first."""
    from edgeslim.core.errors import ConfigError
    from edgeslim.generation import generate_text
    from edgeslim.lm_profile import cache_graph_file

    if greedy and temperature:
        raise ConfigError("--greedy and --temperature exclude each other")
    if n <= 0:
        raise ConfigError(f"-n must be > 0 new tokens, got {n}")
    source = {"weights": weights, "inputs": inputs, "task": task}
    if not item.endswith(".onnx"):
        source["trust"] = trust_of(trusted, trust_source)
    out = console()
    echo = None if as_json else (lambda piece: click.echo(piece, nl=False))
    with cache_graph_file(item, quiet=as_json, **source) as path:
        res = generate_text(path, prompt, n, temperature, threads, chat=not raw, seed=seed, echo=echo)
    if as_json:
        print_json({"source": item, "prompt": prompt, "text": res.text, "prompt_tokens": res.prompt_tokens,
                    "new_tokens": res.new_tokens, "ttft_s": res.ttft_s,
                    "decode_tokens_per_s": res.decode_tokens_per_s, "stopped": res.stopped})
        return
    click.echo()
    why = {"eos": "end of sequence", "length": f"-n {n}",
           "positions": "the model's length limit (its positions): stopped there"}[res.stopped]
    out.print(f"{res.new_tokens} tokens after a {res.prompt_tokens}-token prompt: first token in "
              f"{res.ttft_s * 1000:.0f} ms, then {res.decode_tokens_per_s:.1f} tokens/s (stopped: {why})")
