"""One decoder graph for text and image steps (ort target): `If` the step has image rows, the image graph's body,
else the text graph's, both reading the same weights as outer-scope initializers.

Two sessions over decoder.onnx and decoder_images.onnx each held and prepacked their own copy of every weight
(4B int8: +5.1 GB on the first image prompt). Inside one session ONNX Runtime prepacks an initializer once and
both branches use that copy, so an image prompt costs the vision graph's activations and nothing more. Text steps
feed `image_features` with 0 rows and take the text branch: the same nodes as decoder.onnx, same results.
Only the graphs are combined here: each branch keeps its own nodes and small (inline) initializers untouched,
except the node writing the logits (the lm_head), which both branches share: it runs once after the `If`, on the
hidden rows the taken branch returns. Inside a branch ONNX Runtime prepacked it once per branch (4B int8: a
load-time peak 0.8 GB over the steady text-only RSS); outside, once.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

MULTIMODAL_FILE = "decoder_multimodal.onnx"
COND = "has_image_rows"
LOGITS = "logits"
HIDDEN = "{}.hidden"  # what a branch returns instead of the logits when the lm_head runs after the If


def _external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def _where(t: TensorProto) -> tuple[str, ...]:
    return tuple(sorted((e.key, e.value) for e in t.external_data))


def _branch(graph: onnx.GraphProto, name: str, order: list[str]) -> onnx.GraphProto:
    """`graph`'s nodes as an If branch: no inputs, its external initializers left to the outer scope, its outputs
    renamed (branch values may not reuse the outer If's output names) and put in the If's order."""
    renamed = {o.name: f"{name}.{o.name}" for o in graph.output}
    branch = onnx.GraphProto(name=name)
    branch.CopyFrom(graph)
    branch.name = name
    del branch.input[:]
    del branch.initializer[:]
    branch.initializer.extend(t for t in graph.initializer if not _external(t))
    for node in branch.node:
        node.output[:] = [renamed.get(v, v) for v in node.output]
        node.input[:] = [renamed.get(v, v) for v in node.input]
    outputs = {o.name: o for o in graph.output}
    del branch.output[:]
    for out in order:
        info = onnx.ValueInfoProto()
        info.CopyFrom(outputs[out])
        info.name = renamed[out]
        branch.output.append(info)
    return branch


def _head(graph: onnx.GraphProto, logits: str) -> onnx.NodeProto:
    (node,) = [n for n in graph.node if logits in n.output]
    return node


def _without_head(graph: onnx.GraphProto, logits: str) -> onnx.GraphProto:
    """`graph` with its lm_head node replaced by an Identity to the output `{logits}.hidden` (the head's input)."""
    out = onnx.GraphProto()
    out.CopyFrom(graph)
    head = _head(out, logits)
    index = list(out.node).index(head)
    out.node.remove(head)
    out.node.insert(index, helper.make_node("Identity", [head.input[0]], [HIDDEN.format(logits)],
                                            name=HIDDEN.format(logits)))
    position = [o.name for o in out.output].index(logits)
    out.output.remove(out.output[position])
    out.output.insert(position, helper.make_tensor_value_info(HIDDEN.format(logits), TensorProto.FLOAT, None))
    return out


def _shared_head(text: onnx.GraphProto, images: onnx.GraphProto, logits: str, weights) -> onnx.NodeProto | None:
    """The lm_head node if both graphs end in the same one (same op, attributes and weights), else None."""
    a, b = _head(text, logits), _head(images, logits)
    same = (a.op_type, a.domain, list(a.attribute), list(a.input[1:])) == \
        (b.op_type, b.domain, list(b.attribute), list(b.input[1:]))
    if not same or not a.input[1:] or not all(name in weights for name in a.input[1:]):
        return None
    head = onnx.NodeProto()
    head.CopyFrom(a)
    head.input[0] = HIDDEN.format(logits)
    return head


def combine(text: onnx.ModelProto, images: onnx.ModelProto, image_features: str) -> onnx.ModelProto:
    """decoder.onnx + decoder_images.onnx (loaded without their external data) -> one graph with both steps."""
    tg, ig = text.graph, images.graph
    weights = {t.name: t for t in tg.initializer if _external(t)}
    for t in ig.initializer:
        if _external(t) and (t.name not in weights or _where(weights[t.name]) != _where(t)):
            raise ValueError(f"the image graph reads {t.name!r} from another place than the text graph")
    order = [o.name for o in tg.output]
    if sorted(order) != sorted(o.name for o in ig.output):
        raise ValueError("the text and image graphs have different outputs")
    text_inputs = [i.name for i in tg.input]
    extra = [i for i in ig.input if i.name not in text_inputs]
    if [i.name for i in extra] != [image_features]:
        raise ValueError(f"the image graph's extra inputs are {[i.name for i in extra]}, not [{image_features!r}]")
    outer = set(text_inputs) | {image_features} | set(weights) | set(order) | {COND, f"{COND}.size", f"{COND}.zero"}
    for g in (tg, ig):
        local = {v for n in g.node for v in n.output} | {t.name for t in g.initializer if not _external(t)}
        clash = sorted(local & outer - set(order))
        if clash:
            raise ValueError(f"{g.name}: values {clash[:5]} would shadow the combined graph's own names")
    head = _shared_head(tg, ig, LOGITS, weights) if LOGITS in order else None
    branch_order = order
    if head is not None:
        tg, ig = _without_head(tg, LOGITS), _without_head(ig, LOGITS)
        branch_order = [HIDDEN.format(o) if o == LOGITS else o for o in order]
    nodes = [
        helper.make_node("Size", [image_features], [f"{COND}.size"], name=f"{COND}.size"),
        helper.make_node("Greater", [f"{COND}.size", f"{COND}.zero"], [COND], name=COND),
        helper.make_node("If", [COND], branch_order, name="image_or_text_step",
                         then_branch=_branch(ig, "image_step", branch_order),
                         else_branch=_branch(tg, "text_step", branch_order)),
        *([head] if head is not None else []),
    ]
    zero = helper.make_tensor(f"{COND}.zero", TensorProto.INT64, [], [0])
    graph = helper.make_graph(nodes, text.graph.name, [*text.graph.input, *extra], list(text.graph.output),
                              [*weights.values(), zero])
    model = onnx.ModelProto()
    model.CopyFrom(text)
    model.graph.CopyFrom(graph)
    known = {(f.domain, f.name) for f in model.functions}
    model.functions.extend(f for f in images.functions if (f.domain, f.name) not in known)
    opsets = {o.domain: o.version for o in text.opset_import}
    for o in images.opset_import:
        if opsets.setdefault(o.domain, o.version) != o.version:
            raise ValueError(f"the graphs import different versions of opset {o.domain!r}")
    return model


def write_combined(folder: Path, text_file: str, image_file: str, out_file: str, image_features: str) -> None:
    """Combine two graphs of `folder` into `out_file`; the weights stay where they are (decoder.onnx.data)."""
    text = onnx.load(folder / text_file, load_external_data=False)
    images = onnx.load(folder / image_file, load_external_data=False)
    onnx.save(combine(text, images, image_features), folder / out_file)
