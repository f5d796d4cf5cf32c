"""A QDQ graph's recorded rewrites, replayed (compress/quantize.py's INT8 step): the record's activation grids,
then the tanh tables, output quantizers, uint8 activations, two input planes and conv shapes, in the order the
export applies them; and the bias correction of the output convs, measured on that final graph.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from edgeslim.compress.int8_chains import close_chains, close_outputs, unsigned_activations
from edgeslim.compress.int8_grouped_bias import correct_biases
from edgeslim.compress.int8_kernels import pad_output_channels, shift_columns, split_input_planes
from edgeslim.compress.int8_record import activation_quantizers, set_initializer
from edgeslim.core.errors import ExportValidationError


def overflow_fix(resolved: Mapping[str, Any]) -> str:
    """The recorded overflow fix; artifacts written before it was recorded used NNCF's default."""
    return resolved["nncf"].get("overflow_fix", "first_layer")


def apply_activations(model, wanted: Mapping[str, Any]) -> None:
    """Set the recorded scales and zero points of `model`'s activation quantizers (by node name), in place."""
    found = activation_quantizers(model)
    for name, q in wanted.items():
        set_initializer(model, found[name].input[1], np.asarray(q["scale"], dtype=np.float32))
        set_initializer(model, found[name].input[2], np.asarray(q["zero_point"], dtype=q["dtype"]))
    names = {n for q in found.values() for n in q.input[1:3]}  # NNCF's recorded types: a zero point may change one
    for info in [v for v in model.graph.value_info if v.name in names]:
        model.graph.value_info.remove(info)


def finish_graph(model, fp32, resolved: Mapping[str, Any], where: str, kernels: bool = True) -> None:
    """The recorded rewrites of a QDQ graph whose values are the record's, in place: the tanh tables, the
    output quantizers, uint8 activations, the two input planes and (`kernels`) the conv shapes ORT's fast
    INT8 kernel takes. Artifacts written before a setting existed replay as they were made.

    Raises:
        ExportValidationError: a recorded site is not in the graph (`where` names it).
    """
    if resolved.get("fine_input"):  # first: its second plane's weights are the fp32 weights on NNCF's scales
        split_input_planes(model, fp32)
    try:
        close_chains(model, resolved.get("tanh_table", {}), seven_bit=overflow_fix(resolved) == "first_layer")
    except KeyError as exc:
        raise ExportValidationError(f"{where}: recorded Conv -> Tanh site {exc} is not in the exported graph") from None
    try:
        close_outputs(model, resolved.get("output_ranges", {}))
    except KeyError as exc:
        raise ExportValidationError(f"{where}: recorded Conv output {exc} is not a quantizable graph output of "
                                    "the exported graph") from None
    unsigned_activations(model)  # lossless; lets ORT fuse Convs between uint8 and int8 activations
    if kernels and resolved.get("conv_kernels"):
        pad_output_channels(model)  # lossless; MLAS's ConvSym kernel takes them
        shift_columns(model)


def correct_output_biases(fp32, quantized, resolved: dict, outs: Sequence[str], batches) -> dict[str, float]:
    """Correct the biases of the output convs (`outs`: their outputs) on the final INT8 graph built from
    the record, and record them in `changed`."""
    from onnx import ModelProto, numpy_helper
    final = ModelProto()
    final.CopyFrom(quantized)
    apply_activations(final, resolved["activations"])
    finish_graph(final, fp32, resolved, "the int8 step", kernels=False)
    by_name = {n.name: n for n in final.graph.node}
    pairs = [(by_name[n.name], z) for n in fp32.graph.node for z in outs if z in n.output and len(n.input) > 2]
    convs = [conv for conv, _ in pairs]  # a Conv that wrote a graph output writes its quantizer's input now
    changes = correct_biases(fp32, final, batches, convs, "output convs", fp32_outputs=[z for _, z in pairs])
    inits = {i.name: i for i in final.graph.initializer}
    for conv in convs:
        resolved["changed"][conv.input[2]] = numpy_helper.to_array(inits[conv.input[2]]).tolist()
    return changes
