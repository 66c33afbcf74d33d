"""Fidelity of the guided student to its CFG teacher: adherence of both, PSNR and image gap closed from the same noise."""

from __future__ import annotations

from dataclasses import dataclass

from ..embedded import shapes
from ..embedded.adherence import adherence
from .gap import image_gap_closed
from .sampling import generate_images, mean_psnr


@dataclass(frozen=True)
class FidelityRow:
    guidance_scale: float
    steps: int
    images: int
    teacher_adherence: float
    guide_adherence: float
    psnr_db: float  # mean PSNR of guide images against teacher images from the same seeds
    unguided_adherence: float  # the baseline the guide should beat: no guidance (w = 1)
    unguided_psnr_db: float
    image_gap_closed: float | None  # 1 - MSE(guide, teacher) / MSE(unguided, teacher); None at w = 1 (see gap.py)

    @property
    def adherence_ratio(self) -> float:
        return self.guide_adherence / self.teacher_adherence if self.teacher_adherence else float("nan")


def fidelity(pipe, style: str, prompts: int, scales: list[float], steps_list: list[int], seed: int = 0) -> list[FidelityRow]:
    """Compare `pipe`'s guide with `pipe`'s own CFG teacher on `prompts` one- and `prompts` two-object held-out captions."""
    captions = shapes.heldout_captions(prompts, objects=1) + shapes.heldout_captions(prompts, objects=2)
    rows = []
    for steps in steps_list:
        unguided = generate_images(pipe, captions, 1.0, steps, seed, mode="none")  # the same for every w
        unguided_adherence = adherence(unguided, captions, style)
        for w in scales:
            teacher = generate_images(pipe, captions, w, steps, seed, mode="cfg")
            guided = generate_images(pipe, captions, w, steps, seed, mode="guide")
            rows.append(
                FidelityRow(
                    guidance_scale=w,
                    steps=steps,
                    images=len(captions),
                    teacher_adherence=adherence(teacher, captions, style),
                    guide_adherence=adherence(guided, captions, style),
                    psnr_db=mean_psnr(guided, teacher),
                    unguided_adherence=unguided_adherence,
                    unguided_psnr_db=mean_psnr(unguided, teacher),
                    image_gap_closed=image_gap_closed(guided, unguided, teacher),
                )
            )
    return rows


def fidelity_markdown(rows: list[FidelityRow], title: str) -> str:
    lines = [
        f"**{title}**",
        "",
        "| w | steps | images | teacher adherence | guide adherence | guide / teacher | guide PSNR vs teacher (dB) | image gap closed | no-guidance adherence | no-guidance PSNR vs teacher (dB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.guidance_scale} | {r.steps} | {r.images} | {r.teacher_adherence:.3f} | {r.guide_adherence:.3f} | "
            f"{r.adherence_ratio:.3f} | {r.psnr_db:.1f} | {_optional(r.image_gap_closed)} | {r.unguided_adherence:.3f} | {r.unguided_psnr_db:.1f} |"
        )
    lines += ["", "Image gap closed: 1 = the teacher's images, 0 = no closer to them than no guidance (same prompts and seeds)."]
    return "\n".join(lines)


def _optional(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"

