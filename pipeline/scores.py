"""Class-like scores [N, K] for models that are not classifiers, so that every technique (each
differentiates, perturbs or compares `model(x)[:, k]`) explains them unchanged.

`Scored(net, score)` is the model the techniques see: forward(x) = score(net(x)). It has no
module, parameter or buffer of its own: its `_modules`, `_parameters` and `_buffers` ARE the net's
(the same dicts), so layer names (`layers=[backbone.layer4]`, `python -m pipeline.layers`), hooks,
the state dict, the device and eval mode are the net's, and the net itself is never changed.

  segmentation (torchvision fcn / deeplabv3 / lraspp, output {"out": [N, K, H, W]}, wrapped by
      `pipeline.models.build_model`): score[n, k] = out[n, k] summed over a region: by default where
      k is predicted (argmax over classes == k, read off the same forward's output and detached, as
      a constant), or `score.region=[x, y, w, h]` (model-input pixels), the same box for every class.
  similarity (`target=similar:PATH`, any model whose output is one tensor [N, D, ...]):
      score[n, 0] = cos(net(x)[n], net(reference)), the reference image at PATH read and preprocessed
      like the inputs, its embedding computed once per run.
  detection (torchvision Faster R-CNN / RetinaNet / FCOS, output a list of dicts boxes / labels /
      scores): the targets of input n are the top-k boxes (target=pred: 1, topk:k) of its clean
      input with a score >= score.min_score, found by `detection_batch` before the batch's
      techniques run. Every box of the batch is one column, so a row of any technique's expanded
      batch (occluded copies, IG steps, ...) scores every box and each technique gathers the
      columns of the row's own input, as it gathers classes: score[r, b] = the score of row r's
      detection that matches box b (same label, the highest IoU >= score.iou), 0 when none does.
      On the clean input a box matches itself, so its score is its detection score.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError

SIMILAR = "similar:"  # target=similar:PATH


class Scored(nn.Module):
    """`net` seen through `score`: forward(x) = score(net(x)), sharing every module, parameter and
    buffer of `net` (see the module docstring). Attributes it lacks are read off `net` (e.g. a
    ViT's `num_prefix_tokens`, which pipeline.layouts reads). A TorchScript net, which has no such
    dicts to share, is held as the child `net` (only input-space techniques use one anyway)."""

    def __init__(self, net: nn.Module, score: Callable[[object], torch.Tensor], kind: str,
                 layer_scope: Optional[str] = None):
        super().__init__()
        if not isinstance(net, torch.jit.ScriptModule):
            for key in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
                object.__setattr__(self, key, getattr(net, key))
        else:
            self._modules["net"] = net
        object.__setattr__(self, "net", net)
        object.__setattr__(self, "score", score)
        self.kind = kind  # "segmentation" | "similarity" | "detection"
        self.layer_scope = layer_scope  # default layers are looked for under this module (e.g. "backbone")
        self.training = net.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(self.net(x))

    def train(self, mode: bool = True) -> "Scored":
        self.net.train(mode)
        self.training = mode
        return self

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            net = self.__dict__.get("net")
            if net is None or name.startswith("__"):
                raise
            return getattr(net, name)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, score={self.score!r}, net={type(self.net).__name__}"


def inner(model: nn.Module) -> nn.Module:
    """The network under a Scored wrapper (the model itself otherwise)."""
    return model.net if isinstance(model, Scored) else model


class SegmentationScore:
    """{"out": [N, K, H, W]} -> [N, K]: each class's logits summed over its predicted mask (argmax
    over classes == k, detached), or over `region` (x, y, w, h) in input pixels, mapped onto
    out's grid when it is not the input's (`input_size`)."""

    def __init__(self, region: Optional[Sequence[int]] = None, input_size: Optional[int] = None):
        self.region = tuple(int(v) for v in region) if region is not None else None
        self.input_size = input_size

    def __call__(self, out) -> torch.Tensor:
        logits = segmentation_logits(out)
        if self.region is None:
            mask = F.one_hot(logits.detach().argmax(1), logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
            return (logits * mask).sum((2, 3))
        x, y, w, h = self.region
        H, W = logits.shape[-2:]
        if self.input_size and (H, W) != (self.input_size, self.input_size):
            sy, sx = H / self.input_size, W / self.input_size
            x0, y0 = int(x * sx), int(y * sy)
            x1, y1 = max(x0 + 1, int(round((x + w) * sx))), max(y0 + 1, int(round((y + h) * sy)))
            return logits[:, :, y0:y1, x0:x1].sum((2, 3))
        return logits[:, :, y:y + h, x:x + w].sum((2, 3))

    def __repr__(self) -> str:
        return f"region={list(self.region)}" if self.region else "predicted mask"


def segmentation_logits(out) -> torch.Tensor:
    """out["out"] [N, K, H, W] of a torchvision segmentation model's output dict."""
    return out["out"]


def is_segmentation_output(out) -> bool:
    return isinstance(out, dict) and torch.is_tensor(out.get("out")) and out["out"].dim() == 4


class SimilarityScore:
    """embedding [N, D, ...] -> [N, 1]: cosine similarity of each (flattened) embedding to `reference` [D']."""

    def __init__(self, reference: torch.Tensor, name: str):
        self.reference, self.name = reference.detach().flatten(), name

    def __call__(self, out) -> torch.Tensor:
        e = out.flatten(1)
        ref = self.reference.to(e.device, e.dtype)
        return F.cosine_similarity(e, ref[None], dim=1, eps=1e-8)[:, None]

    def __repr__(self) -> str:
        return f"cosine similarity to {self.name}"


def is_detection_output(out) -> bool:
    return (isinstance(out, (list, tuple)) and len(out) > 0 and isinstance(out[0], dict)
            and all(key in out[0] for key in ("boxes", "labels", "scores")))


def detection_classes(net: nn.Module) -> Optional[int]:
    """The label count of a torchvision detector (Faster R-CNN's box predictor, RetinaNet's / FCOS's
    classification head), None when neither is there."""
    predictor = getattr(getattr(net, "roi_heads", None), "box_predictor", None)
    if predictor is not None and hasattr(predictor, "cls_score"):
        return int(predictor.cls_score.out_features)
    head = getattr(getattr(net, "head", None), "classification_head", None)
    return int(head.num_classes) if head is not None and hasattr(head, "num_classes") else None


class DetectionScore:
    """list of {boxes [D, 4], labels [D], scores [D]} -> [N, B]: for every box b of the batch's
    reference (`boxes` [B, 4], `labels` [B]; label -1: an empty slot, never matched), the score of
    the row's detection of the same label whose IoU with b is highest and >= `iou`, else 0 (kept in
    the graph, so a gradient of it is zero, not missing). Without a reference: [N, 0]."""

    def __init__(self, iou: float = 0.5):
        self.iou = float(iou)
        self.boxes: Optional[torch.Tensor] = None
        self.labels: Optional[torch.Tensor] = None

    def __call__(self, out) -> torch.Tensor:
        from torchvision.ops import box_iou

        rows = []
        for det in out:
            scores = det["scores"]
            if self.boxes is None:
                rows.append(scores.sum()[None][:0])  # no reference: no column
                continue
            B = self.boxes.shape[0]
            if scores.numel() == 0:
                rows.append(scores.sum() * torch.zeros(B, device=scores.device, dtype=scores.dtype))
                continue
            boxes, labels = self.boxes.to(scores.device), self.labels.to(scores.device)
            iou = box_iou(boxes, det["boxes"].detach())  # [B, D]
            ok = (iou >= self.iou) & (labels[:, None] == det["labels"][None])
            best = torch.where(ok, iou, torch.full_like(iou, -1.0)).argmax(1)  # [B]
            rows.append(scores[best] * ok.any(1).to(scores.dtype))
        return torch.stack(rows)

    def __repr__(self) -> str:
        return f"matched detection score (IoU >= {self.iou})"


@dataclass
class Detections:
    """The reference boxes of a batch: per input its top-k boxes of the clean input.
    boxes [N, K, 4] (input pixels x0, y0, x1, y1), labels [N, K] (-1: no box), scores [N, K] (NaN:
    no box), valid [N, K], targets [N, K]: each box's column in the scores (n * K + j)."""

    boxes: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor
    valid: torch.Tensor
    targets: torch.Tensor


def select_boxes(out: List[dict], k: int, min_score: float) -> Detections:
    """The top-k detections with score >= min_score of each input (fewer: empty slots)."""
    N, device = len(out), out[0]["scores"].device if out else "cpu"
    boxes = torch.zeros(N, k, 4, device=device)
    labels = torch.full((N, k), -1, dtype=torch.long, device=device)
    scores = torch.full((N, k), float("nan"), device=device)
    for n, det in enumerate(out):
        s = det["scores"].detach()
        keep = torch.nonzero(s >= min_score).flatten()
        keep = keep[s[keep].argsort(descending=True)][:k]
        boxes[n, :len(keep)] = det["boxes"].detach()[keep].float()
        labels[n, :len(keep)] = det["labels"][keep]
        scores[n, :len(keep)] = s[keep].float()
    targets = torch.arange(N * k, device=device).view(N, k)
    return Detections(boxes, labels, scores, labels >= 0, targets)


@contextmanager
def detection_batch(model: nn.Module, x: torch.Tensor, k: int, min_score: float) -> Iterator[Optional[Detections]]:
    """For a detection model: the batch's reference boxes (one forward without grad), set as the
    score's reference for the block and cleared after it; yields None for any other model. Inside
    it, techniques explain `found.targets` (give them as the Pass's `targets`: TargetSpec.select
    cannot tell one input's columns from another's)."""
    if not (isinstance(model, Scored) and model.kind == "detection"):
        yield None
        return
    with torch.no_grad():
        found = select_boxes(model.net(x), k, min_score)
    score = model.score
    score.boxes, score.labels = found.boxes.flatten(0, 1), found.labels.flatten()
    try:
        yield found
    finally:
        score.boxes = score.labels = None


def similar_path(target: str) -> Optional[str]:
    """PATH of target=similar:PATH (None for any other target)."""
    text = str(target).strip()
    return text[len(SIMILAR):].strip() if text.startswith(SIMILAR) else None


def check_region(region, input_size: Optional[int] = None) -> None:
    """score.region: [x, y, w, h] whole numbers, x, y >= 0, w, h >= 1, inside the input when its size is known."""
    r = list(region)
    if len(r) != 4 or any(not isinstance(v, int) or isinstance(v, bool) for v in r) or min(r[:2]) < 0 or min(r[2:]) < 1:
        raise ConfigError(f"score.region={r}: expected [x, y, w, h] in model-input pixels, whole numbers "
                          "with x, y >= 0 and w, h >= 1")
    if input_size is not None and (r[0] + r[2] > input_size or r[1] + r[3] > input_size):
        raise ConfigError(f"score.region={r} does not fit inside the model input ({input_size}x{input_size} "
                          "pixels, model.input_size)")


def check_detection_run(model, cfg) -> None:
    """A detection run: target=pred (the top box) or topk:k (the top k boxes); the evaluations that
    read the targets' scores as a softmax over classes are refused; score.iou set on the score."""
    target = str(cfg.target).strip()
    if target != "pred" and not target.startswith("topk:"):
        raise ConfigError(f"target={target}: {model.description} is a detection model, whose targets are its "
                          "detected boxes: target=pred (the top box) or target=topk:<k> (the top k boxes)")
    ev = cfg.evaluate
    refused = [key for key in ("deletion", "insertion", "road", "confidence", "sanity") if ev.get(key)]
    if refused:
        raise ConfigError(f"evaluate.{', evaluate.'.join(refused)} read(s) a softmax over classes or a model copy; "
                          f"not available for the detection model {model.description}")
    model.module.score.iou = float(cfg.score.get("iou", 0.5))


def read_reference(path: str, model) -> torch.Tensor:
    """The image at `path` as one model input [1, 3, S, S], preprocessed like the inputs (shorter
    side resized, centre crop, normalised); a missing or undecodable file is a ConfigError."""
    import cv2
    import numpy as np

    from pipeline.data.base import prepare

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"target=similar:{path}: the reference image {str(file)!r} does not exist")
    data = np.fromfile(str(file), dtype=np.uint8)
    try:
        image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    except cv2.error:
        image = None
    if image is None:
        raise ConfigError(f"target=similar:{path}: the reference image cannot be decoded (corrupt or not an image)")
    x, _ = prepare(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), None, model.preprocess)
    return x[None]


def configure(model, cfg, device) -> None:
    """Apply the run's `score.region` and `target=similar:PATH` to the LoadedModel `model` (in
    place: its module, class names and number of classes), before any work; ConfigError on misuse."""
    region = (cfg.get("score") or {}).get("region")
    path = similar_path(cfg.target)
    module = model.module
    if isinstance(module, Scored) and module.kind == "detection":
        check_detection_run(model, cfg)
    if region is not None:
        if not (isinstance(module, Scored) and module.kind == "segmentation"):
            raise ConfigError("score.region sums a segmentation model's class logits over a box; "
                              f"{model.description} is not a segmentation model")
        check_region(region, model.preprocess.input_size)
        module.score = SegmentationScore(region, model.preprocess.input_size)
    if path is None:
        return
    if not path:
        raise ConfigError("target=similar:PATH needs the reference image's path, e.g. target=similar:ref.jpg")
    if isinstance(module, Scored) or model.is_video:
        raise ConfigError(f"target=similar:PATH compares image embeddings; {model.description} "
                          f"is a {module.kind if isinstance(module, Scored) else 'video'} model")
    reference = read_reference(path, model).to(device)
    with torch.no_grad():
        embedding = module(reference)
    if not torch.is_tensor(embedding):
        raise ConfigError(f"target=similar:PATH needs a model whose output is one embedding tensor [N, D]; "
                          f"{model.description} returns a {type(embedding).__name__}")
    name = Path(path).name
    model.module = Scored(module, SimilarityScore(embedding[0], name), "similarity")
    model.class_names, model.num_classes = [f"similarity to {name}"], 1
