"""The synthetic dataset factory: class-balanced synthetic X-rays as Parquet shards, on Ray Data.

    from cxrfactory.synthesis import SynthesisConfig, synthesize
    manifest = synthesize(SynthesisConfig(generator="runs/demo/generator",
                                          out="s3://bucket/cxr-synth", target_per_class=20_000))

``plan`` (config, seeds, files to write; no Ray), ``exclusions`` (the images memorization
audits flagged, for a clean set; no Ray), ``rows`` (PNG and row of one generated image,
:func:`regenerate`), ``pipeline`` (the Ray Data run, resume, the manifest).
"""

from cxrfactory.synthesis.exclusions import Audit, Exclusions, load_exclusions
from cxrfactory.synthesis.pipeline import (
    ShardWriter,
    SynthesisRun,
    actor_resources,
    prepare_synthesis,
    run_synthesis,
    synthesize,
)
from cxrfactory.synthesis.plan import (
    ClassPlan,
    SynthesisConfig,
    SynthesisError,
    WorkItem,
    exclude_images,
    format_plan,
    image_seed,
    image_seeds,
    plan_classes,
    plan_work,
    real_counts,
    synthetic_image_id,
)
from cxrfactory.synthesis.rows import encode_image, regenerate, resize_image, synthetic_rows

__all__ = [
    "Audit", "ClassPlan", "Exclusions", "ShardWriter", "SynthesisConfig", "SynthesisError",
    "SynthesisRun", "WorkItem", "actor_resources", "encode_image", "exclude_images", "format_plan",
    "image_seed", "image_seeds", "load_exclusions", "plan_classes", "plan_work",
    "prepare_synthesis", "real_counts", "regenerate", "resize_image", "run_synthesis",
    "synthesize", "synthetic_image_id", "synthetic_rows",
]
