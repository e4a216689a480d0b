"""Visual tokens and their consumer: the stand-ins for LLaVA's vision tower and language model.

LLaVA feeds the patch tokens of a CLIP vision transformer, through a small projector, to a
language model that answers a question about the image. Chapter 9 (PruMerge) needs the same
pipeline small enough to train on a CPU:

- :func:`vision_tower` builds a CLIP vision transformer with transformers' ``CLIPVisionModel``;
  :func:`pretrain_vision_tower` trains it on :class:`effnb.data.QuestionScenes` with two auxiliary
  heads (the CLS token names each quadrant's shape and colour; each penultimate-layer patch token
  names the object under it), so that, as in CLIP, the patch tokens stay local and the CLS token
  attends to the informative ones;
- :func:`encode` returns what PruMerge reads: the penultimate layer's patch tokens, and the last
  layer's keys (the patches' and the CLS token's own) and CLS query (taken with forward hooks, as the
  official code does);
- :class:`Consumer` is the language model's stand-in: question tokens followed by projected visual
  tokens, a small transformer, an answer read at the first position; :func:`fit_consumer` and
  :func:`answer_accuracy` train and score it on full or reduced token sets.

The token-reduction method itself is written in the chapter. Introduced in Chapter 9.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from effnb.config import check_count, progress_bar
from effnb.train import (CHECKPOINT_DIR, checkpoint_fix, load_checkpoint, read_listed_checkpoint,
                         save_listed_checkpoint)
from effnb.data import ANSWERS, QUADRANTS, QUESTION_COLOURS, QUESTION_SHAPES, QUESTION_TYPES, QuestionScenes

__all__ = ["CHECKPOINT", "Consumer", "Encoded", "MAKE_SCRIPT", "Reduce", "answer_accuracy", "encode", "fit_consumer",
           "load_vision_tower", "pretrain_vision_tower", "save_vision_tower", "vision_tower"]

CHECKPOINT = CHECKPOINT_DIR / "clip_scenes32.safetensors"
MAKE_SCRIPT = "python scripts/make_vision_tower.py"

# (encoded batch, generator) -> (tokens (B, M, D), padding mask (B, M), True = padding)
Reduce = Callable[["Encoded", torch.Generator], tuple[torch.Tensor, torch.Tensor]]



def _fraction(hits: torch.Tensor) -> float:
    """The share of True in ``hits``, an integer count divided in Python (float64): 135 / 150 >= 0.9 holds."""
    return int(hits.sum()) / hits.numel()

def vision_tower(image_size: int = 32, patch_size: int = 4, width: int = 64, layers: int = 4, heads: int = 4):
    """A randomly initialised ``CLIPVisionModel`` (transformers) for ``image_size``² RGB images cut into
    ``patch_size``² patches: ``(image_size / patch_size)²`` patch tokens plus CLS, ``width`` wide."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if image_size % patch_size:
        raise ValueError(f"patch_size={patch_size} must divide image_size={image_size}, e.g. patch_size=4.")
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                              num_channels=3)
    return CLIPVisionModel(config)


def save_vision_tower(tower, path: str | Path, settings: dict, metadata: dict | None = None) -> str:
    """Save ``tower`` with the :func:`vision_tower` keyword arguments ``settings`` (and ``metadata``) as
    safetensors, and record its sha256 in ``SHA256SUMS`` beside it (:func:`effnb.train.save_listed_checkpoint`,
    crash-safe). Returns the sha256."""
    return save_listed_checkpoint(tower, path, {"settings": settings, **(metadata or {})})


def load_vision_tower(path: str | Path = CHECKPOINT, device: torch.device | str = "cpu"):
    """Build and load a :func:`save_vision_tower` checkpoint after checking its sha256 against
    ``SHA256SUMS``; returns ``(tower in eval mode, metadata)``. A missing or changed file raises an error
    naming the script that re-creates it."""
    path = Path(path)
    metadata = read_listed_checkpoint(path, checkpoint_fix(MAKE_SCRIPT), label=f"The vision tower {path}")
    tower = vision_tower(**metadata["settings"])
    load_checkpoint(tower, path)
    return tower.to(device).eval(), metadata


def _aux_heads(width: int) -> nn.ModuleDict:
    """The pretraining heads: per quadrant shape (+ empty) and colour (+ empty) from CLS; the object
    label (0 background, 1 + 4 shape + colour) from each patch token."""
    return nn.ModuleDict({
        "quadrants": nn.Linear(width, len(QUADRANTS) * (len(QUESTION_SHAPES) + 1 + len(QUESTION_COLOURS) + 1)),
        "patches": nn.Linear(width, 1 + 4 * len(QUESTION_SHAPES)),
    })


def _aux_losses(tower, heads: nn.ModuleDict, images: torch.Tensor, shapes: torch.Tensor, colours: torch.Tensor,
                patch_labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The summed cross-entropies of the two heads, and their accuracies."""
    out = tower(pixel_values=images, output_hidden_states=True)
    s = len(QUESTION_SHAPES) + 1
    quad = heads["quadrants"](out.pooler_output).view(len(images), len(QUADRANTS), -1)
    patches = heads["patches"](out.hidden_states[-2][:, 1:])
    shape_logits, colour_logits = quad[..., :s], quad[..., s:]
    loss = (F.cross_entropy(shape_logits.flatten(0, 1), (shapes + 1).flatten())
            + F.cross_entropy(colour_logits.flatten(0, 1), (colours + 1).flatten())
            + F.cross_entropy(patches.flatten(0, 1), patch_labels.flatten()))
    accuracy = {"shape": _fraction(shape_logits.argmax(-1) == shapes + 1),
                "colour": _fraction(colour_logits.argmax(-1) == colours + 1),
                "patch": _fraction(patches.argmax(-1) == patch_labels)}
    return loss, accuracy


def pretrain_vision_tower(tower, train: QuestionScenes, test: QuestionScenes, steps: int, batch_size: int = 64,
                          lr: float = 2e-3, seed: int = 0, progress: bool = True) -> dict:
    """Train ``tower`` (from :func:`vision_tower`) with the auxiliary heads on ``train`` for ``steps``
    AdamW steps (cosine learning rate); return the heads' accuracies on ``test``
    (``shape``/``colour`` per quadrant from CLS, ``patch`` per patch token). The heads are discarded."""
    check_count("steps", steps, 2000)
    device = next(tower.parameters()).device
    patch = tower.config.patch_size
    heads = _aux_heads(tower.config.hidden_size).to(device)
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    labels = train.patch_labels(patch)
    gen = torch.Generator().manual_seed(seed)
    tower.train()
    for _ in progress_bar(range(steps), "vision tower", enabled=progress):
        idx = torch.randint(0, len(train), (batch_size,), generator=gen)
        loss, _ = _aux_losses(tower, heads, train.images[idx].to(device), train.shapes[idx].to(device),
                              train.colours[idx].to(device), labels[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    tower.eval()
    with torch.no_grad():
        _, accuracy = _aux_losses(tower, heads, test.images.to(device), test.shapes.to(device),
                                  test.colours.to(device), test.patch_labels(patch).to(device))
    return accuracy


@dataclass(frozen=True)
class Encoded:
    """What the token reduction reads, for ``N`` images of ``P`` patches and width ``D``.

    ``features`` ``(N, P, D)``: the penultimate layer's patch tokens (LLaVA's ``select_layer=-2``, CLS
    dropped); ``keys`` ``(N, P, D)``: the last layer's keys of the patch tokens; ``cls_query`` ``(N, D)``:
    the last layer's query of the CLS token; ``cls_key`` ``(N, D)``: the last layer's key of the CLS token
    itself, which the official code's softmax includes (keys and queries over the full width, one head, as
    in the official PruMerge code).
    """

    features: torch.Tensor
    keys: torch.Tensor
    cls_query: torch.Tensor
    cls_key: torch.Tensor

    def __len__(self) -> int:
        return self.features.shape[0]

    def subset(self, index) -> Encoded:
        """The rows ``index`` of every tensor."""
        return Encoded(self.features[index], self.keys[index], self.cls_query[index], self.cls_key[index])


@torch.no_grad()
def encode(tower, images: torch.Tensor, batch_size: int = 512) -> Encoded:
    """Run ``tower`` on ``images`` ``(N, 3, S, S)`` and return :class:`Encoded` (float32, on the CPU,
    whatever the tower's dtype and device).

    The keys (the patches' and CLS's) and the CLS query are caught by forward hooks on the last layer's
    ``k_proj`` and ``q_proj``; the hooks are removed before returning."""
    attention = tower.vision_model.encoder.layers[-1].self_attn if hasattr(tower, "vision_model") \
        else tower.encoder.layers[-1].self_attn
    caught = {}
    hooks = [attention.k_proj.register_forward_hook(lambda m, i, o: caught.__setitem__("k", o)),
             attention.q_proj.register_forward_hook(lambda m, i, o: caught.__setitem__("q", o))]
    device = next(tower.parameters()).device
    parts = []
    try:
        tower.eval()
        for start in range(0, len(images), batch_size):
            out = tower(pixel_values=images[start:start + batch_size].to(device), output_hidden_states=True)
            parts.append(tuple(t.float().cpu() for t in (out.hidden_states[-2][:, 1:], caught["k"][:, 1:],
                                                          caught["q"][:, 0], caught["k"][:, 0])))
    finally:
        for hook in hooks:
            hook.remove()
    return Encoded(*(torch.cat(part) for part in zip(*parts)))


class Consumer(nn.Module):
    """The language model's stand-in: ``[question token, projector(visual tokens)]`` through a
    pre-norm transformer encoder; the answer is read at the question token.

    ``forward(tokens (B, M, D_vision), question (B, 2), padding (B, M) or None)`` returns answer logits
    ``(B, len(ANSWERS))``; padded visual tokens (``True`` in ``padding``) are masked out of attention,
    so a batch can hold images with different token counts.
    """

    def __init__(self, vision_width: int = 64, width: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.projector = nn.Sequential(nn.Linear(vision_width, width), nn.GELU(), nn.Linear(width, width))
        self.question_type = nn.Embedding(len(QUESTION_TYPES), width)
        self.question_arg = nn.Embedding(len(QUADRANTS), width)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, len(ANSWERS))

    def forward(self, tokens: torch.Tensor, question: torch.Tensor, padding: torch.Tensor | None = None):
        """Answer logits for each row of the batch."""
        ask = self.question_type(question[:, 0]) + self.question_arg(question[:, 1])
        x = torch.cat([ask[:, None], self.projector(tokens)], 1)
        if padding is not None:
            padding = torch.cat([torch.zeros_like(padding[:, :1]), padding], 1)
        return self.head(self.body(x, src_key_padding_mask=padding)[:, 0])


def _tokens(encoded: Encoded, reduce: Reduce | None, gen: torch.Generator):
    """All patch tokens (no padding), or what ``reduce`` keeps of them."""
    return (encoded.features, None) if reduce is None else reduce(encoded, gen)


def fit_consumer(model: Consumer, encoded: Encoded, scenes: QuestionScenes, steps: int, batch_size: int = 128,
                 lr: float = 2e-3, seed: int = 0, reduce: Reduce | None = None, desc: str = "consumer",
                 progress: bool = True) -> list[float]:
    """Train ``model`` to answer ``scenes``' questions from ``encoded``'s tokens for ``steps`` AdamW steps
    (cosine learning rate); with ``reduce`` every batch is reduced first (a finetune on reduced tokens).
    The batches depend only on ``seed``. Returns the loss of every step."""
    check_count("steps", steps, 500)
    if len(encoded) != len(scenes):
        raise ValueError(f"encoded has {len(encoded)} images but scenes has {len(scenes)}; encode the same scenes.")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in progress_bar(range(steps), desc, enabled=progress):
        idx = torch.randint(0, len(scenes), (batch_size,), generator=gen)
        tokens, padding = _tokens(encoded.subset(idx), reduce, gen)
        loss = F.cross_entropy(model(tokens, scenes.question[idx], padding), scenes.answer[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def answer_accuracy(model: Consumer, encoded: Encoded, scenes: QuestionScenes, reduce: Reduce | None = None,
                    seed: int = 0) -> dict[str, float]:
    """Share of ``scenes``' questions ``model`` answers right from ``encoded``'s tokens (reduced by
    ``reduce``, drawing from a generator seeded with ``seed``): ``"all"`` and one entry per question
    type (the first word pair of :data:`QUESTION_TYPES`, e.g. ``"how many"``)."""
    model.eval()
    tokens, padding = _tokens(encoded, reduce, torch.Generator().manual_seed(seed))
    right = model(tokens, scenes.question, padding).argmax(-1) == scenes.answer
    result = {"all": _fraction(right)}          # counts divided exactly, so a threshold compares exactly
    for kind, text in enumerate(QUESTION_TYPES):
        rows = scenes.question[:, 0] == kind
        result[" ".join(text.split()[:2])] = _fraction(right[rows]) if rows.any() else float("nan")
    return result
