"""Open-vocabulary detectors that ground phrases in images, loaded with Hugging Face `transformers` from a
local `save_pretrained` folder (nothing is downloaded): Grounding DINO and OWLv2.

`detect(images, phrases, threshold)` takes a batch of RGB images (uint8 H x W x 3, as displayed: EXIF
orientation applied) with the phrases to look for in each, runs one forward pass and returns, per
image, one Detection per (box, phrase) pair whose score reaches the threshold: the phrase as label,
the box's corners in the image's pixels (clipped to the image; boxes with no area inside are
dropped) and the score.

- Grounding DINO: the prompt is the image's phrases joined as "phrase one. phrase two." (lower case,
  as the model was trained); a box's score for a phrase is the mean over the phrase's tokens of the
  sigmoid of the box's token logits (the token-span phrase grounding of Grounding DINO's own
  inference code), so a box may ground several phrases. Phrases that do not fit in one prompt
  (max_text_len tokens) go into further prompts for the same image.
- OWLv2: each phrase is a text query; a box's score for a phrase is the sigmoid of its logit. OWLv2
  predicts one box per image patch, so near-duplicates of a phrase are removed by non-maximum
  suppression (IoU NMS_IOU). Boxes come relative to the image padded to a square (bottom, right).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from agree.io import InputError
from dataprep.geometry import clip_to_image
from dataprep.grounding import Detection

DETECTORS = ("grounding-dino", "owlv2")
MODEL_TYPES = {"grounding-dino": "grounding-dino", "owlv2": "owlv2"}  # config.json's model_type
DEFAULT_THRESHOLD = {"grounding-dino": 0.35, "owlv2": 0.1}
NMS_IOU = 0.3
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")
HOW = "save the model and its processor there with save_pretrained (docs/data.md, 'Grounding boxes from a detector')"


def check_folder(name: str, path: str | Path) -> Path:
    """The detector folder holds a `name` model's config, weights and processor files; else an InputError."""
    if name not in DETECTORS:
        raise InputError(
            f"--detector: unknown detector {name!r} (choose from {', '.join(DETECTORS)})"
        )
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"--detector-path: folder not found: {path} ({HOW})")
    config = path / "config.json"
    if not config.is_file():
        raise InputError(
            f"--detector-path: no config.json in {path}: not a save_pretrained folder ({HOW})"
        )
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise InputError(f"--detector-path: cannot read {config} ({e})") from None
    if model_type != MODEL_TYPES[name]:
        raise InputError(
            f"--detector-path: {path} holds a {model_type!r} model, not the {MODEL_TYPES[name]!r} "
            f"that --detector {name} needs"
        )
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise InputError(
            f"--detector-path: no model weights in {path} (looked for {', '.join(WEIGHT_FILES)}); {HOW}"
        )
    if not any((path / f).is_file() for f in PROCESSOR_FILES):
        raise InputError(
            f"--detector-path: no processor files in {path} (looked for {' or '.join(PROCESSOR_FILES)}); "
            f"{HOW}"
        )
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise InputError(
            f"--detector-path: no tokenizer files in {path} (looked for {', '.join(TOKENIZER_FILES)}); "
            f"{HOW}"
        )
    return path


def _transformers():
    try:
        import transformers
    except ImportError:
        raise InputError(
            "--detector needs the transformers package: pip install -e '.[grounding]'"
        ) from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _load(name: str, path: Path, model_class: str, device: str):
    tf = _transformers()
    import torch

    try:
        processor = tf.AutoProcessor.from_pretrained(path, local_files_only=True)
        model = getattr(tf, model_class).from_pretrained(path, local_files_only=True)
    except ImportError as e:  # e.g. scipy for OWLv2's image processor in transformers 4.x
        raise InputError(f"--detector {name}: {e} (pip install -e '.[grounding]')") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"--detector-path: cannot load {name} from {path} ({e}); {HOW}") from None
    try:
        device = torch.device(device)
        model = model.to(device).float().eval()
    except (RuntimeError, AssertionError) as e:
        raise InputError(f"--device {device}: {e}") from None
    fast = getattr(tf, type(processor.image_processor).__name__ + "Fast", None)
    if not _on_device(processor.image_processor) and fast is not None:
        # transformers 4.x: the torchvision-based image processor resizes on the GPU
        processor.image_processor = fast.from_pretrained(path, local_files_only=True)
    return processor, model, device


def _on_device(image_processor) -> bool:
    """Whether the image processor is torchvision-based (takes a device)."""
    names = {c.__name__ for c in type(image_processor).__mro__}
    return bool(names & {"TorchvisionBackend", "BaseImageProcessorFast"})


def _pixels(image_processor, images: Sequence[np.ndarray], device) -> dict:
    """The image processor's tensors on `device` (the torchvision-based processors resize on it)."""
    kw = {"device": device} if _on_device(image_processor) else {}
    out = image_processor(images=list(images), return_tensors="pt", **kw)
    return {k: v.to(device) for k, v in out.items()}


def _corners(boxes, scale):
    """(cx, cy, w, h) relative -> (x0, y0, x1, y1) times scale (N, 4) = (W, H, W, H) per row."""
    import torch

    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * scale


def _detections(pairs, labels, sizes) -> list[list[Detection]]:
    """Detections from (image, box row, label index, score) rows; boxes clipped to their image."""
    out: list[list[Detection]] = [[] for _ in sizes]
    for i, box, label, score in pairs:
        w, h = sizes[i]
        c = clip_to_image(tuple(float(v) for v in box), w, h)
        if c is None:
            continue
        c = tuple(round(v, 2) for v in c)
        if c[2] <= c[0] or c[3] <= c[1]:
            continue
        out[i].append(Detection(labels[i][label], c, round(float(score), 4)))
    return out


@dataclass
class _Prompt:
    image: int  # index in the batch
    phrases: list[str]
    text: str


class GroundingDino:
    """Grounding DINO (GroundingDinoForObjectDetection and its processor)."""

    name = "grounding-dino"

    def __init__(self, path: str | Path, device: str = "cpu"):
        path = check_folder(self.name, path)
        self.processor, self.model, self.device = _load(
            self.name, path, "GroundingDinoForObjectDetection", device
        )
        self.tokenizer = self.processor.tokenizer
        self.max_tokens = int(self.model.config.max_text_len)

    def _prompts(self, phrases: Sequence[Sequence[str]]) -> list[_Prompt]:
        flat = [p for ps in phrases for p in ps]
        if not flat:
            return []
        lengths = iter(
            len(ids) for ids in self.tokenizer(flat, add_special_tokens=False)["input_ids"]
        )
        prompts = []
        for i, ps in enumerate(phrases):
            chunk: list[str] = []
            used = 2  # [CLS] and [SEP]
            for p in ps:
                n = next(lengths) + 1  # and its "."
                if chunk and used + n > self.max_tokens:
                    prompts.append(_Prompt(i, chunk, ". ".join(chunk) + "."))
                    chunk, used = [], 2
                if used + n <= self.max_tokens:  # a phrase longer than a whole prompt is left out
                    chunk.append(p)
                    used += n
            if chunk:
                prompts.append(_Prompt(i, chunk, ". ".join(chunk) + "."))
        return prompts

    def _spans(self, prompts: list[_Prompt], offsets, length: int):
        """(U, J, L) float: row j of prompt u = 1 / n on the n tokens of phrase j (mean over its tokens)."""
        import torch

        n_phrases = max(len(p.phrases) for p in prompts)
        spans = torch.zeros(len(prompts), n_phrases, length)
        for u, p in enumerate(prompts):
            start, bounds = 0, []
            for phrase in p.phrases:
                bounds.append((start, start + len(phrase)))
                start += len(phrase) + 2  # ". "
            for t, (a, b) in enumerate(offsets[u].tolist()):
                if b <= a:  # special and padding tokens
                    continue
                for j, (s, e) in enumerate(bounds):
                    if s <= a and b <= e:
                        spans[u, j, t] = 1.0
                        break
        return spans / spans.sum(-1, keepdim=True).clamp(min=1.0)

    def detect(
        self, images: Sequence[np.ndarray], phrases: Sequence[Sequence[str]], threshold: float
    ) -> list[list[Detection]]:
        """One forward pass over every (image, prompt) of the batch; see the module doc."""
        import torch

        sizes = [(im.shape[1], im.shape[0]) for im in images]
        prompts = self._prompts(phrases)
        if not prompts:
            return [[] for _ in images]
        enc = self.tokenizer(
            [p.text for p in prompts],
            padding="longest",
            return_offsets_mapping=True,
            return_tensors="pt",
        )
        offsets = enc.pop("offset_mapping")
        length = enc["input_ids"].shape[1]
        spans = self._spans(prompts, offsets, length).to(self.device)
        real = spans.sum(-1) > 0  # (U, J): a real phrase (not padding)
        pixels = _pixels(
            self.processor.image_processor, [images[p.image] for p in prompts], self.device
        )
        with torch.inference_mode():
            out = self.model(**pixels, **{k: v.to(self.device) for k, v in enc.items()})
            probs = out.logits[:, :, :length].float().sigmoid()  # (U, Q, L)
            scores = probs @ spans.transpose(1, 2)  # (U, Q, J)
            keep = (scores >= threshold) & real[:, None, :]
            scale = torch.tensor(
                [sizes[p.image] * 2 for p in prompts], dtype=torch.float32, device=self.device
            )
            boxes = _corners(out.pred_boxes.float(), scale[:, None, :])  # (U, Q, 4)
            u, q, j = keep.nonzero(as_tuple=True)
            rows = zip(
                u.tolist(), boxes[u, q].cpu().tolist(), j.tolist(), scores[u, q, j].cpu().tolist()
            )
        labels = [p.phrases for p in prompts]
        found = _detections(rows, labels, [sizes[p.image] for p in prompts])
        per_image: list[list[Detection]] = [[] for _ in images]
        for p, dets in zip(prompts, found):
            per_image[p.image] += dets
        return per_image


class Owlv2:
    """OWLv2 (Owlv2ForObjectDetection and its processor)."""

    name = "owlv2"

    def __init__(self, path: str | Path, device: str = "cpu"):
        path = check_folder(self.name, path)
        self.processor, self.model, self.device = _load(
            self.name, path, "Owlv2ForObjectDetection", device
        )
        self.tokenizer = self.processor.tokenizer
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)

    def detect(
        self, images: Sequence[np.ndarray], phrases: Sequence[Sequence[str]], threshold: float
    ) -> list[list[Detection]]:
        """One forward pass over the batch, every image with its phrases as queries; see the module doc."""
        import torch
        from torchvision.ops import batched_nms

        sizes = [(im.shape[1], im.shape[0]) for im in images]
        n_queries = max((len(p) for p in phrases), default=0)
        if n_queries == 0:
            return [[] for _ in images]
        queries = [q for ps in phrases for q in list(ps) + [" "] * (n_queries - len(ps))]
        enc = self.tokenizer(
            queries,
            padding="max_length",
            max_length=self.max_tokens,
            truncation=True,
            return_tensors="pt",
        )
        real = torch.tensor(
            [[j < len(ps) for j in range(n_queries)] for ps in phrases], device=self.device
        )
        pixels = _pixels(self.processor.image_processor, images, self.device)
        with torch.inference_mode():
            out = self.model(
                input_ids=enc["input_ids"].to(self.device),
                attention_mask=enc["attention_mask"].to(self.device),
                pixel_values=pixels["pixel_values"],
            )
            scores = out.logits.float().sigmoid()  # (B, P, Q)
            keep = (scores >= threshold) & real[:, None, :]
            side = torch.tensor([max(s) for s in sizes], dtype=torch.float32, device=self.device)
            boxes = _corners(out.pred_boxes.float(), side[:, None, None])  # (B, P, 4)
            b, p, q = keep.nonzero(as_tuple=True)
            kept_boxes, kept_scores = boxes[b, p], scores[b, p, q]
            groups = b * n_queries + q  # NMS within each (image, phrase)
            nms = batched_nms(kept_boxes, kept_scores, groups, NMS_IOU)
            rows = zip(
                b[nms].tolist(),
                kept_boxes[nms].cpu().tolist(),
                q[nms].tolist(),
                kept_scores[nms].cpu().tolist(),
            )
        return _detections(rows, [list(ps) for ps in phrases], sizes)


def load_detector(name: str, path: str | Path, device: str = "cpu"):
    """The detector called `name` (see DETECTORS) from its save_pretrained folder, on `device`."""
    check_folder(name, path)
    return {"grounding-dino": GroundingDino, "owlv2": Owlv2}[name](path, device)


def default_threshold(name: str, threshold: Optional[float]) -> float:
    """`threshold`, or the detector's usual box threshold when it is None."""
    if threshold is None:
        return DEFAULT_THRESHOLD[name]
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"--box-threshold must be between 0 and 1, got {threshold}")
    return float(threshold)
