"""What the ONNX fusion passes (rms_norm.py, rotary.py) share: a graph's nodes indexed by the tensors they make
and read, to find a chain whose inner tensors nothing else reads, and the rewrite that puts one node in its place."""
from __future__ import annotations

import numpy as np


class Chains:
    """The nodes of an ONNX graph, with each tensor's producer, its reader count and the constants."""

    def __init__(self, graph) -> None:
        from onnx import numpy_helper
        self.graph = graph
        self.nodes = list(graph.node)  # one Python object per node, so identities hold
        self.consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.readers: dict[str, int] = {}
        for name in [i for n in self.nodes for i in n.input] + [o.name for o in graph.output]:
            self.readers[name] = self.readers.get(name, 0) + 1

    def only(self, name: str, op: str):
        """The node of type `op` making `name` when nothing but the chain reads `name`, else None."""
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op and self.readers.get(name) == 1 else None

    def scalar(self, name: str) -> float | None:
        value = self.consts.get(name)
        return float(value.item()) if isinstance(value, np.ndarray) and value.size == 1 else None

    def rewrite(self, replaced: dict[int, object], drop: set[int]) -> None:
        """Put `replaced[id(node)]` in each such node's place, leave out the `drop` ones, then every node whose
        outputs nothing reads any more (the chains' leftover inputs)."""
        nodes = [replaced.get(id(n), n) for n in self.nodes if id(n) not in drop]
        outputs = {o.name for o in self.graph.output}
        while True:
            read = {i for n in nodes for i in n.input} | outputs
            kept = [n for n in nodes if any(o in read for o in n.output)]
            if len(kept) == len(nodes):
                break
            nodes = kept
        del self.graph.node[:]
        self.graph.node.extend(nodes)
