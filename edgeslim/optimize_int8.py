"""Per-op precision of an INT8 stage under a time budget: which compute ops stay fp32.

An INT8 stage quantizes every Conv / MatMul / Gemm it can. When the INT8 graph is faster than a --speedup or
--latency-ms budget, the slack buys loss back: the ops whose INT8 costs the most task loss per millisecond it
saves stay fp32 (the int8 step's `fp32_ops`, ONNX node names). Each op is scored by its loss-measured
sensitivity: the task loss on the calibration data of the INT8 graph with that op alone back in fp32, run in
ONNX Runtime, less the INT8 graph's own (static QDQ: the DequantizeLinear nodes on its inputs taken out,
int8_sensitivity.reverted; dynamic: ORT's quantize_dynamic again with the op excluded). Each op's time is
its share, by multiply-adds (int8_sensitivity.op_macs), of the stage's measured saving: the original's p50
less the INT8 graph's, timed side by side on the target (the INT8 kernels are timed; only their split among
the ops is by work). A static op's share counts the kernels it unfuses too (a Conv whose output quantizer
only fed it runs in fp32 as well: int8_sensitivity.int8_ops before and after), as keep_sensitive counts them,
and is timed as well: each graph with one op fp32 beside the INT8 graph, the larger cost kept. A dynamic
MatMul fuses nothing: on MiniLM the share priced 14 of them at 1.51x, measured 1.50x. On EfficientNet-Lite0
the share priced 7 convs at 1.52x (measured 1.03x), the timed costs 4 convs at 1.51x (measured 1.07x) while
the mix was built with NNCF's `ignored`, whose placement leaves more convs fp32 than the revert that scored
them; the mix is now built with `fp32_ops` (static: the same revert after NNCF's placement, replayed from the
record; dynamic: the same exclusion from quantize_dynamic) so it is built as scored: 5 convs estimated
1.53x, measured 1.49x (docs/optimize.md).
An op is a PrecisionLayer in milliseconds (fp32: the ms its kernel saves; INT8: none
more than the measured graph), so optimize_precision's greedy (the shared allocator) picks them.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from edgeslim.compress.sensitivity import mean_loss
from edgeslim.core.calib import CalibData
from edgeslim.core.progress import bar, say
from edgeslim.optimize_precision import PrecisionLayer

Timing = Callable[[Sequence[Path]], list[float]]  # ONNX files -> p50 ms of each, timed side by side on the target


def int8_layers(fp32_path: Path, int8_path: Path, resolved: Mapping[str, Any], data: CalibData, saving_ms: float,
                timing: Timing | None = None, progress: bool = True) -> list[PrecisionLayer]:
    """Every compute op the INT8 stage (its record `resolved`) runs as an INT8 kernel in `int8_path` (the stage
    replayed on `fp32_path`), with its cost fp32 and its loss change on `data` (which has targets): the INT8
    graph's task loss less the one with that op alone fp32. The cost is the op's share of `saving_ms` by
    multiply-adds; with `timing` (files -> p50 ms on the target, side by side) a static op's cost is also
    measured, its graph's p50 less the INT8 graph's, and the larger of the two is kept."""
    import onnx

    from edgeslim.compress.int8_sensitivity import op_macs
    from edgeslim.runtime.session import OrtModule

    fp32 = onnx.load(str(fp32_path))
    ops, one_fp32 = _op_reverter(fp32, fp32_path, int8_path, resolved)
    timing = None if resolved.get("activations_mode") == "dynamic" else timing
    names = {i.name for i in fp32.graph.input}
    feeds = {k: v[:1].numpy() for k, v in data.batches[0].items() if k in names}
    macs = op_macs(fp32, ops, feeds)
    total = max(sum(macs.values()), 1)
    quantized = mean_loss(OrtModule(int8_path), data)
    delta, cost = {}, {}
    with tempfile.TemporaryDirectory(prefix="edgeslim-int8-ops-") as tmp:
        paths = [Path(tmp) / f"op{i}.onnx" for i in range(len(ops))]
        with bar(f"loss of each of {len(ops)} INT8 ops put back in fp32 alone", len(ops), progress) as shown:
            for op, path in zip(ops, paths):
                cost[op] = saving_ms * sum(macs[o] for o in one_fp32(op, path)) / total
                delta[op] = quantized - mean_loss(OrtModule(path), data)
                if timing is None:
                    path.unlink()
                shown.advance()
        if timing is not None and ops:
            say(f"timing the INT8 graph and its {len(ops)} graphs with one op fp32 side by side on the target")
            times = timing([int8_path, *paths])
            cost = {op: max(cost[op], ms - times[0]) for op, ms in zip(ops, times[1:])}
    return [PrecisionLayer(op, cost[op], 0.0, delta[op]) for op in ops]


def _op_reverter(fp32, fp32_path: Path, int8_path: Path, resolved: Mapping[str, Any]
                 ) -> tuple[list[str], Callable[[str, Path], set[str]]]:
    """The INT8 kernels' op names, and how to write the INT8 graph with one of them fp32 (which returns the
    kernels that graph runs in fp32: the op and those it unfuses)."""
    import onnx

    if resolved.get("activations_mode") == "dynamic":
        from edgeslim.compress.int8_dynamic import quantize_dynamic_graph
        record = resolved["dynamic"]
        inits, ignored = {i.name for i in fp32.graph.initializer}, set(record.get("ignored", ()))
        ops = [n.name for n in fp32.graph.node if n.op_type in record["op_types"] and len(n.input) > 1
               and n.input[1] in inits and n.name not in ignored]

        def dynamic(op: str, path: Path) -> set[str]:
            quantize_dynamic_graph(dict(record) | {"ignored": [*record.get("ignored", ()), op]}, fp32_path, path)
            return {op}
        return ops, dynamic

    from edgeslim.compress.int8_sensitivity import int8_ops, op_quantizers, reverted
    quantized = onnx.load(str(int8_path))
    dqs, kernels = op_quantizers(quantized), int8_ops(quantized)

    def static(op: str, path: Path) -> set[str]:
        model = reverted(quantized, fp32, dqs[op])
        onnx.save(model, str(path))
        return kernels - int8_ops(model)
    return sorted(kernels & set(dqs)), static
