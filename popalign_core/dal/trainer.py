"""`popalign dal`: distributional alignment by adjusted direct finetuning (patent [0103]-[0114], Algorithm A.1).

    popalign dal --config examples/dal_toy.yaml          # every config key is also a flag: --steps 200 ...

One optimiser step, for each of `prompts_per_step` neutral prompts drawn from `prompts`:

1. N = `images_per_prompt` initial noises, seeded per (seed, step, prompt, k) with `sampling.derive_seed`.
2. Originals o_i: the frozen model (LoRA disabled, no prefix) from the same noises, without gradient; classified
   (face, box, class probabilities) and embedded once.
3. Current images x_i (DFT sampler, `dft.generate`); the classifier's probabilities on their faces give the dynamic
   OT targets (y_i, c_i) of the whole group (`dal.dal_targets`, patent [0105]-[0106]); a group without any face is
   skipped with a warning and counted (`skipped_groups`).
4. The loss, in micro-batches of `micro_batch` images that are regenerated with gradient (exact: the targets are
   fixed for the step, and every term is a sum over images):

       L = L_align + L_img + lambda_face * L_face                                                   ([0109])
       L_align = 1/N_f sum_i 1[c_i >= C] CE(h(face(x_i)), y_i)                                         (Eq. 6)
       L_img   = 1/N sum_i w_i sum_e (1 - cos(e(x_i), e(o_i)))          e in `embedders` (CLIP, DINOv2; Eq. 7)
       L_face  = 1/N_f sum_i (1 - cos(emb(face(x_i)), emb(F_i)))                                       ([0108])

   w_i = lambda_img1 where the targets agree with the original's classes (h(face(o_i)), every used axis), else
   lambda_img2, with the gradient inside the face box scaled by lambda_img3 / lambda_img2 (so the face region has
   weight lambda_img3: [0109]; the public code scales the gradient in the box the same way). Images without a face
   in x_i get only L_img (weight lambda_img1). F_i is the nearest face of the reference bank (max cosine; the
   patent's "min" of a cosine is read as the closest face), or o_i's own face when o_i already has the target class
   with confidence >= `face_own_threshold` (public code). N is the number of images of the step, N_f the faces.
5. Backward through the sampler with the adjusted gradient of `gradient` (`dft.GRADIENTS`), clip, AdamW step.

What is trained (`train`): "text_encoder" (LoRA on attention + MLP, the patent's main setting), "unet", "both",
or "prefix" (a soft prompt prefix of `prefix_tokens` tokens, saved as a textual-inversion embedding). Checkpoints
(trainable weights + optimiser) every `checkpoint_every` steps; `resume: auto` continues from the latest one, with the
same images and targets as an uninterrupted run. Metrics per step go to metrics.jsonl / metrics.csv.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from popalign_core.classify.classifiers import make_classifier
from popalign_core.common.fileio import atomic_path
from popalign_core.common.userinput import (
    ArgumentParser,
    command,
)
from popalign_core.dal.config import (  # noqa: F401 - re-exported: the module's public API
    TRAIN_TARGETS,
    DALConfig,
    build_target,
    load_dal_config,
)
from popalign_core.dal.dft import GRADIENTS, check_model, generate
from popalign_core.dal.embedders import FaceBank, make_embedder
from popalign_core.dal.loss import dal_targets
from popalign_core.dal.ot import METHODS, MODES
from popalign_core.lora.files import LoraSpec, add_lora, lora_metadata, model_hash
from popalign_core.lora.inject import denoiser_targets
from popalign_core.models.sampling import SamplerConfig, initial_noise
from popalign_core.train.loop import TrainerBase, TrainingError

__all__ = ["TRAIN_TARGETS", "DALConfig", "DALTrainer", "build_target", "load_dal_config", "main", "run_dal"]


# ------------------------------------------------------------------------------------------------ face model
class _FaceModel:
    """The classifier as DAL needs it: detection (face flag, box) without gradient, and differentiable logits and
    face crops. The toy classifier's face head is its detector and its probabilities come from the whole image;
    other backends detect with their detector (`classify`) and get the box crop, resized, with gradient."""

    def __init__(self, clf):
        if not getattr(clf, "differentiable", False) or not callable(getattr(clf, "logits", None)):
            raise ValueError(
                f"classifier {getattr(clf, 'name', type(clf).__name__)!r} is not differentiable: DAL back-propagates "
                "through the classifier; use toy, fairface, clip or deepface"
            )
        self.clf = clf
        self.toy = hasattr(clf, "heads")
        self.axes = {a: tuple(c) for a, c in clf.axes.items()}

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """images [B, 3, H, W] in [0, 1] -> (face [B] bool, boxes [B, 4] as fractions x0, y0, x1, y1)."""
        if self.toy:
            out, _ = self.clf.heads(images)
            face = (torch.sigmoid(out["face"][:, 0]) >= self.clf.face_threshold).cpu().numpy()
            return face, torch.sigmoid(out["box"]).double().cpu().numpy()
        u8 = list(images.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy())
        res = self.clf.classify(u8)
        h, w = images.shape[-2:]
        face = np.array([bool(r.face_found and r.box is not None) for r in res])
        boxes = np.array([[r.box[0] / w, r.box[1] / h, r.box[2] / w, r.box[3] / h] if f else [0, 0, 1, 1]
                          for r, f in zip(res, face)], dtype=np.float64)  # fmt: skip
        return face, boxes

    def crops(self, images: torch.Tensor, boxes: np.ndarray) -> torch.Tensor:
        """Face crops with gradient (the toy world: the whole image)."""
        if self.toy:
            return images
        h, w = images.shape[-2:]
        out = []
        for img, b in zip(images, boxes):
            x0, y0 = int(b[0] * w), int(b[1] * h)
            x1, y1 = max(int(math.ceil(b[2] * w)), x0 + 1), max(int(math.ceil(b[3] * h)), y0 + 1)
            out.append(F.interpolate(img[None, :, y0:y1, x0:x1], size=(h, w), mode="bilinear", align_corners=False))
        return torch.cat(out)

    def logits(self, images: torch.Tensor, boxes: np.ndarray) -> dict[str, torch.Tensor]:
        return self.clf.logits(self.crops(images, boxes))


def _box_mask(boxes: np.ndarray, shape, inside: torch.Tensor, device) -> torch.Tensor:
    """[B, 1, H, W] multiplier: `inside[b]` in the face box of row b, 1 elsewhere."""
    b, _, h, w = shape
    ys = (torch.arange(h, device=device).float() + 0.5) / h
    xs = (torch.arange(w, device=device).float() + 0.5) / w
    bx = torch.as_tensor(boxes, dtype=torch.float32, device=device)
    in_y = (ys[None, :] >= bx[:, 1:2]) & (ys[None, :] <= bx[:, 3:4])
    in_x = (xs[None, :] >= bx[:, 0:1]) & (xs[None, :] <= bx[:, 2:3])
    box = (in_y[:, :, None] & in_x[:, None, :])[:, None].float()
    return 1.0 + box * (inside.to(device).view(b, 1, 1, 1) - 1.0)


class _GradMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, m):
        ctx.save_for_backward(m)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        (m,) = ctx.saved_tensors
        return g * m, None


# ------------------------------------------------------------------------------------------------ trainer
class DALTrainer(TrainerBase):
    """Runs one DAL job (module docstring) on the trainer skeleton (`train.loop.TrainerBase`: output folder,
    checkpoints, metrics, the run loop)."""

    COMMAND = "dal"  # the same files as the LoRA trainer (the embedding of train=prefix is <lora_name>.safetensors)

    def __init__(self, cfg: DALConfig, log=None, on_step=None, adapter=None):
        self.prefix = None
        super().__init__(cfg, log=log, adapter=adapter, on_step=on_step)

    def _summary_facts(self, rows: list[dict]) -> dict:
        skipped = sum(int(r.get("skipped_groups", 0)) for r in rows)
        return {"method": "dal", "train": self.cfg.train, "skipped_groups": skipped}

    # ---------------------------------------------------------------------------------------- setup
    def _prompts(self) -> list[str]:
        cfg = self.cfg
        prompts = [str(p) for p in cfg.prompts]
        if cfg.prompts_file:
            p = Path(cfg.prompts_file)
            if not p.is_file():
                raise FileNotFoundError(f"prompts_file={cfg.prompts_file!r} does not exist")
            prompts += [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        prompts = list(dict.fromkeys(prompts))
        if not prompts:
            raise ValueError("prompts: no training prompt (give prompts or prompts_file)")
        return prompts

    def _setup_classifier(self):
        cfg = self.cfg
        opts = dict(cfg.classifier_options)
        if cfg.classifier == "toy":
            opts.setdefault("which", "train")
        kwargs = {} if cfg.classifier == "toy" else {"detector": cfg.detector}
        clf = make_classifier(cfg.classifier, weights=cfg.classifier_weights, device=str(self.dist.device), **kwargs,
                              **opts)  # fmt: skip
        self.face = _FaceModel(clf)
        self.target = build_target(cfg.target, self.face.axes)
        self.t_axes = [a.name for a in self.target.axes]
        if cfg.ot_method == "exact":  # refused now, not after the first sampled batch
            from popalign_core.dal.ot import check_exact_size

            try:
                check_exact_size(cfg.images_per_prompt, len(self.target.probs))
            except ValueError as exc:
                raise ValueError(
                    f"ot_method='exact' with images_per_prompt={cfg.images_per_prompt} and the "
                    f"target's {len(self.target.probs)} joint classes: {exc}"
                ) from None
        if "joint" in cfg.target and cfg.prompt_targets:
            raise ValueError("prompt_targets: only with a per-axis `target` (not a joint one)")
        self.prompt_target = {}
        for prompt, spec in cfg.prompt_targets.items():
            unknown = sorted(set(spec) - set(self.t_axes))
            if unknown:
                raise ValueError(f"prompt_targets[{prompt!r}]: axes {unknown} are not axes of `target` {self.t_axes}")
            try:
                self.prompt_target[prompt] = build_target({**cfg.target, **spec}, self.face.axes)
            except ValueError as exc:
                raise ValueError(f"prompt_targets[{prompt!r}]: {exc}") from None

    def _setup_embedders(self):
        cfg = self.cfg
        self.embedders = {}
        names = list(cfg.embedders)
        face_name = cfg.face_embedder or (names[0] if names else None)
        if cfg.lambda_face > 0 and face_name is None:
            raise ValueError("face_embedder: lambda_face > 0 needs an embedder (set face_embedder or embedders)")

        for name in dict.fromkeys([*names, *([face_name] if cfg.lambda_face > 0 else [])]):
            w = cfg.embedder_weights.get(name)
            if name == "toy" and w is None and cfg.classifier == "toy":
                w = cfg.classifier_weights
            self.embedders[name] = make_embedder(name, weights=w, device=str(self.dist.device))
        self.img_embedders = names
        self.face_embedder = face_name if cfg.lambda_face > 0 else None
        self.bank = None
        if self.face_embedder is not None:
            emb = self.embedders[self.face_embedder]
            if cfg.face_bank == "toy":
                from popalign_core.toyworld.classifier import ToyClassifier

                if self.face_embedder != "toy":
                    raise ValueError("face_bank='toy' holds toy-embedder vectors: set face_embedder: toy")
                self.bank = FaceBank.from_tensor(ToyClassifier(cfg.classifier_weights, which="train").face_bank())
                self.bank = self.bank.to(self.dist.device)
            else:
                self.bank = FaceBank.from_folder(cfg.face_bank, emb).to(self.dist.device)

    def _setup_model(self):
        cfg = self.cfg
        adapter = self._load_adapter()
        check_model(adapter, self.dft_cfg)  # flow models: the flow-Euler sampler and no 'a1' (before any work)
        adapter.unet.requires_grad_(False)
        adapter.vae.requires_grad_(False)
        for te in adapter.text_encoders:
            te.requires_grad_(False)
        torch.manual_seed(cfg.seed)
        if cfg.train == "prefix":
            from popalign_core.dal.prefix import SoftPrefix

            self.prefix = SoftPrefix.attach(adapter, n_tokens=cfg.prefix_tokens, token=cfg.prefix_token,
                                            init_text=cfg.prefix_init)  # fmt: skip
            params = list(self.prefix.parameters())
        else:
            spec = LoraSpec(
                rank=cfg.lora_rank,
                alpha=float(cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank),
                unet_targets=denoiser_targets(cfg.unet_targets) if cfg.train in ("unet", "both") else None,
                text_encoder_targets=tuple(cfg.text_encoder_targets)
                if cfg.train in ("text_encoder", "both")
                else None,
            )
            add_lora(adapter, spec)
            params = [p for p in adapter.trainable_parameters() if p.requires_grad]
        self._set_trainable(params)

    def _roots(self):
        if self.prefix is not None:
            yield "prefix", self.prefix
            return
        yield from super()._roots()

    def _setup_optimizer(self):
        self.opt = torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    # ---------------------------------------------------------------------------------------- one step
    def _apply(self, prompts: list[str]) -> list[str]:
        return self.prefix.apply(prompts) if self.prefix is not None else prompts

    def _noise(self, step: int, prompt: str, n: int) -> torch.Tensor:
        sc = SamplerConfig(seed=self.cfg.seed, height=self.cfg.resolution, width=self.cfg.resolution)
        return initial_noise(self.adapter, [(f"{prompt}\n#dal-step {step}", k) for k in range(n)], sc)

    def _step_prompts(self, step: int) -> list[str]:
        rng = np.random.default_rng([self.cfg.seed, step])
        if not self.prompt_target:
            k = min(self.cfg.prompts_per_step, len(self.prompts))
            return [self.prompts[i] for i in rng.choice(len(self.prompts), size=k, replace=False)]
        ident = list(self.prompt_target)
        return [self.prompts[rng.integers(len(self.prompts))] if rng.random() < self.cfg.neutral_share
                else ident[rng.integers(len(ident))] for _ in range(self.cfg.prompts_per_step)]  # fmt: skip

    def _embed(self, name: str, images: torch.Tensor) -> torch.Tensor:
        return self.embedders[name].embed(images)

    def _group(self, step: int, g: int, prompt: str, keep_graph: bool = False) -> dict[str, Any] | None:
        """Originals, targets and weights of one prompt's N images. keep_graph: generate the current images with
        gradient once and keep them for the loss (one micro-batch per prompt); else without gradient (the loss
        regenerates them in micro-batches)."""

        cfg, n = self.cfg, self.cfg.images_per_prompt
        noise = self._noise(step, prompt, n)
        dcfg = self.dft_cfg
        with torch.no_grad():
            with self.adapter.reference():
                orig = generate(self.adapter, [prompt] * n, noise, dcfg)
            face_o, box_o = self.face.detect(orig)
            p_o = {a: t.float().softmax(-1).double().cpu().numpy() for a, t in
                   self.face.logits(orig, box_o).items()}  # fmt: skip
            with torch.enable_grad() if keep_graph else contextlib.nullcontext():
                x_graph = generate(self.adapter, self._apply([prompt] * n), noise, dcfg)
            cur = x_graph.detach()
            face_x, box_x = self.face.detect(cur)
            p_x = {a: t.float().softmax(-1).double().cpu().numpy() for a, t in
                   self.face.logits(cur, box_x).items()}  # fmt: skip
            emb_o = {e: self._embed(e, orig) for e in self.img_embedders}
            own = None
            if self.face_embedder is not None:
                own = self.embedders[self.face_embedder].embed(self.face.crops(orig, box_o))
        if not face_x.any():
            return {"skipped": True, "n": n, "faces": 0}
        target = self.prompt_target.get(prompt, self.target)
        t = dal_targets({a: p_x[a] for a in self.t_axes}, target, threshold=cfg.threshold, face=face_x,
                        method=cfg.ot_method, mode=cfg.ot_mode, seed=cfg.seed * 1_000_003 + step * 101 + g,
                        draws=cfg.ot_draws)  # fmt: skip
        # dynamic weights: agree = on every used axis the target is the original's class (originals with a face)
        cls_o = {a: p_o[a].argmax(1) for a in self.t_axes}
        agree = np.ones(n, bool)
        for a in self.t_axes:
            agree &= ~t.used[a] | (face_o & (cls_o[a] == t.targets[a]))
        conf_o = np.ones(n)
        for a in self.t_axes:
            conf_o = np.minimum(conf_o, p_o[a][np.arange(n), np.maximum(t.targets[a], 0)])
        use_own = face_o & face_x & agree & (conf_o >= cfg.face_own_threshold)
        shares = {a: np.bincount(p_x[a][face_x].argmax(1), minlength=len(self.face.axes[a])) / max(face_x.sum(), 1)
                  for a in self.t_axes}  # fmt: skip
        return {
            "skipped": False, "prompt": prompt, "noise": noise, "n": n, "faces": int(face_x.sum()),
            "face_x": face_x, "box_x": box_x, "box_o": box_o, "targets": t, "agree": agree, "use_own": use_own,
            "emb_o": emb_o, "own": own, "shares": shares, "x": x_graph if keep_graph else None, "target": target,
            "neutral": prompt not in self.prompt_target,
        }  # fmt: skip

    def _micro_loss(self, grp: dict, rows: np.ndarray, n_total: int, n_faces: int) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        if grp["x"] is not None and len(rows) == grp["n"]:
            x = grp["x"]  # generated with gradient in `_group` (one micro-batch per prompt)
        else:
            x = generate(self.adapter, self._apply([grp["prompt"]] * len(rows)), grp["noise"][rows], self.dft_cfg)
        dev = x.device
        face_x, t = grp["face_x"][rows], grp["targets"]
        loss = x.new_zeros(())
        parts = {"align": 0.0, "img": 0.0, "face": 0.0}
        # L_align (Eq. 6): CE on the faces with a confident target, divided by the step's faces
        fr = np.flatnonzero(face_x)
        if len(fr):
            logits = self.face.logits(x[fr], grp["box_x"][rows][fr])
            for a in self.t_axes:
                ok = t.used[a][rows][fr]
                if ok.any():
                    y = torch.as_tensor(t.targets[a][rows][fr][ok], device=dev)
                    ce = F.cross_entropy(logits[a][torch.as_tensor(np.flatnonzero(ok), device=dev)].float(), y,
                                         reduction="sum") / n_faces  # fmt: skip
                    loss = loss + ce
                    parts["align"] += float(ce.detach())
        # L_img (Eq. 7) with the dynamic weights of [0109]
        if self.img_embedders:
            agree = grp["agree"][rows] | ~face_x
            w = torch.as_tensor(np.where(agree, cfg.lambda_img1, cfg.lambda_img2), dtype=torch.float32, device=dev)
            ratio = cfg.lambda_img3 / cfg.lambda_img2 if cfg.lambda_img2 > 0 else 0.0
            inside = torch.as_tensor(np.where(agree, 1.0, ratio), dtype=torch.float32)
            xm = _GradMask.apply(x, _box_mask(grp["box_x"][rows], x.shape, inside, dev))
            for e in self.img_embedders:
                cos = (self._embed(e, xm) * grp["emb_o"][e][rows].to(dev)).sum(-1)
                li = (w * (1 - cos)).sum() / n_total
                loss = loss + li
                parts["img"] += float(li.detach())
        # L_face ([0108]): nearest bank face, or the original's own face
        if self.face_embedder is not None and len(fr):
            emb = self.embedders[self.face_embedder].embed(self.face.crops(x[fr], grp["box_x"][rows][fr]))
            cos_bank, _ = self.bank.nearest(emb)
            own = grp["use_own"][rows][fr]
            cos_own = (emb * grp["own"][rows][fr].to(dev)).sum(-1)
            cos = torch.where(torch.as_tensor(own, device=dev), cos_own, cos_bank)
            lf = cfg.lambda_face * (1 - cos).sum() / n_faces
            loss = loss + lf
            parts["face"] += float(lf.detach())
        return loss, parts

    def _accumulate(self, step: int) -> tuple[dict[str, float], list[dict]]:
        """Gradients of step `step` in the parameters' .grad (zeroed first; with several processes, this process's
        share of the sum: `_train_step` all-reduces); returns (metrics over all processes, this process's live
        groups). The step's prompt groups are dealt round-robin to the processes; the normalisers N and N_f are
        global, so the summed gradient equals one process's gradient on the whole step."""
        cfg, dist = self.cfg, self.dist
        single = not cfg.micro_batch or cfg.micro_batch >= cfg.images_per_prompt
        mine = [(g, p) for g, p in enumerate(self._step_prompts(step)) if g % dist.world == dist.rank]
        # one micro-batch per prompt: the images of the targets are kept with their graph (with checkpointing, the
        # graph holds the per-step latents, not the UNet activations) and back-propagated after all targets are in
        groups = [self._group(step, g, p, keep_graph=single) for g, p in mine]
        live = [g for g in groups if not g["skipped"]]
        counts = dist.sum(torch.tensor([len(groups) - len(live), sum(g["n"] for g in live),
                                        sum(g["faces"] for g in live)], dtype=torch.float64))  # fmt: skip
        skipped, n_total, n_faces = int(counts[0]), int(counts[1]), int(counts[2])
        if len(groups) - len(live):
            msg = f"step {step}: {len(groups) - len(live)} prompt batch(es) had no face and were skipped"
            warnings.warn(msg, stacklevel=2)
            self.log(f"[dal] warning: {msg}")
        self.opt.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "align": 0.0, "img": 0.0, "face": 0.0}
        mb = cfg.micro_batch or cfg.images_per_prompt
        for grp in live:
            for s in range(0, grp["n"], mb):
                rows = np.arange(s, min(s + mb, grp["n"]))
                loss, parts = self._micro_loss(grp, rows, n_total, n_faces)
                if not torch.isfinite(loss):
                    raise TrainingError(f"loss is not finite (NaN/inf) at step {step}; lower lr")
                if loss.requires_grad:
                    loss.backward()
                for k, v in parts.items():
                    sums[k] += v
                sums["loss"] += float(loss.detach())
        # per-group statistics, averaged over the groups of all processes: (sum, count) pairs
        stats: dict[str, list[float]] = {}
        for a in self.t_axes:
            i = self.t_axes.index(a)
            stats[f"confident_{a}"] = [float(g["targets"].used[a].sum() / g["faces"]) for g in live]
            # total-variation distance between the batch's class shares (training classifier) and the target:
            # neutral prompts (batch_error) and prompts with their own target (identity_error)
            for name, keep in (("batch_error", True), ("identity_error", False)):
                stats[f"{name}_{a}"] = [
                    float(np.abs(g["shares"][a] - g["target"].marginal(g["target"].axes[i]).probs).sum() / 2)
                    for g in live if g["neutral"] == keep
                ]  # fmt: skip
        keys = sorted(stats)
        flat = [*(sums[k] for k in sums), *(sum(stats[k]) for k in keys), *(len(stats[k]) for k in keys)]
        red = dist.sum(torch.tensor(flat, dtype=torch.float64)).tolist()
        row: dict[str, float] = {"skipped_groups": float(skipped), **dict(zip(sums, red[: len(sums)]))}
        if n_total:
            row["faces"] = n_faces / n_total
        tot, cnt = red[len(sums) : len(sums) + len(keys)], red[len(sums) + len(keys) :]
        for k, t, c in zip(keys, tot, cnt):
            if c:
                row[k] = t / c
        return row, live if n_total else []

    def _train_step(self, step: int) -> dict[str, float]:
        row, live = self._accumulate(step)
        if not live and not row.get("faces"):
            return row  # no face in the whole step (every process): no update
        self._all_reduce_grads(mean=False)  # the sum of the processes' shares (global normalisers: no division)
        grad_norm = 0.0
        if self.cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        if not all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self.params):
            raise TrainingError(f"gradients are not finite at step {step}; the update was not applied")
        self.opt.step()
        row["grad_norm"] = grad_norm
        return row

    def setup(self) -> DALTrainer:
        """Everything before the first step (also used by tests and the acceptance run to inspect gradients)."""

        cfg = self.cfg
        self.prompts = self._prompts()
        self._setup_classifier()  # bad targets / classes / non-differentiable classifiers fail before any model work
        self.dft_cfg = cfg.dft()
        self._setup_embedders()
        self._setup_model()
        self.base_hash = model_hash(self.adapter.unet)
        self._setup_optimizer()
        return self

    # ---------------------------------------------------------------------------------------- outputs
    def _save_outputs(self, step: int) -> dict[str, str]:
        cfg = self.cfg
        if self.prefix is not None:
            path = self.out / f"{cfg.lora_name}.safetensors"
            self.prefix.save(path, metadata={"popalign_method": "dal", "popalign_step": str(step)})
            return {"embedding": str(path)}
        meta = lora_metadata(
            loss="dal",
            hyperparameters={
                "target": cfg.target,
                "threshold": cfg.threshold,
                "gradient": cfg.gradient,
                "lr": cfg.lr,
                "steps": step,
                "train": cfg.train,
            },  # fmt: skip
            base_model_hash=self.base_hash,
            data_hash=hashlib.sha256("\n".join(self.prompts).encode()).hexdigest(),
            popalign_step=str(step),
        )
        return self._save_lora(meta)

    def _plot(self, rows: list[dict]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axs = plt.subplots(1, 2, figsize=(10, 3.5), dpi=100)
        steps = [r["step"] for r in rows]
        for k in ("loss", "align", "img", "face"):
            axs[0].plot(steps, [r.get(k, float("nan")) for r in rows], lw=1, label=k)
        axs[0].set_xlabel("step")
        axs[0].legend()
        for a in self.t_axes:
            axs[1].plot(steps, [r.get(f"batch_error_{a}", float("nan")) for r in rows], lw=1, label=a)
        axs[1].set_xlabel("step")
        axs[1].set_ylabel("batch class shares: distance to target")
        axs[1].legend()
        fig.tight_layout()
        with atomic_path(self.out / "loss_curve.png") as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)


def run_dal(cfg: DALConfig | None = None, log=None, on_step=None, adapter=None, **overrides) -> dict:
    """Run a DAL job: `run_dal(DALConfig(...))` or `run_dal(model=..., prompts=[...], target={...})`."""
    if cfg is None:
        cfg = load_dal_config(None, **overrides)
    elif overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    return DALTrainer(cfg, log=log, on_step=on_step, adapter=adapter).run()


def build_parser():
    ap = ArgumentParser(
        prog="popalign dal",
        description="Distributional alignment (DAL) by adjusted direct finetuning. Every config key is also a flag; "
        "list and mapping values are YAML (e.g. --target '{form: [0.5, 0.5]}').",
    )
    ap.add_argument("--config", help="YAML file with DALConfig keys (flags override it)")
    ap.add_argument("--targets", help="the target as inline JSON or a .json file (same as --target)")
    choices = {"train": list(TRAIN_TARGETS), "gradient": list(GRADIENTS), "ot_method": list(METHODS),
               "ot_mode": list(MODES)}  # fmt: skip
    DALConfig.add_arguments(ap, choices=choices)
    return ap


def _read_targets(text: str) -> dict:
    p = Path(text)
    if text.endswith(".json") and not p.is_file():
        raise FileNotFoundError(f"--targets: file {text!r} does not exist")
    try:
        raw = p.read_text(encoding="utf-8") if text.endswith(".json") else text
        val = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--targets: not valid JSON or a readable .json file ({exc})") from None
    if not isinstance(val, dict):
        raise ValueError("--targets: expected a JSON object {axis: probabilities}")
    return val


@command("popalign dal")
def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(a).items() if k not in ("config", "targets") and v is not None}
    if a.targets is not None:
        overrides["target"] = _read_targets(a.targets)
    summary = DALTrainer(load_dal_config(a.config, **overrides)).run()
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
