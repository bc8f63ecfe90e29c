"""`igds plan` for every shipped config on the given GPU types: one summary row each, then the full tables.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/plan_configs.py [--gpus A10G-24GB,H100-80GB]

The configs' pools are placeholders (s3://YOUR-BUCKET), so the pool size is given: the math configs
use MetaMathQA's 395,000 rows, the others 100,000; every row is taken as 300 tokens (both assumed).
The Qwen3 config's own SAE is planned as 65,536 latents (16x).
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

from igds_ray.config import from_dict, load_yaml
from igds_ray.pipeline import RunConfig
from igds_ray.plan import plan, render

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", default="A10G-24GB,H100-80GB")
    args = ap.parse_args()
    rows, full = [], []
    for path in sorted(glob.glob(str(ROOT / "configs" / "*.yaml"))):
        cfg = from_dict(RunConfig, load_yaml(path))
        name = Path(path).stem
        for gpu in args.gpus.split(","):
            p = plan(cfg, gpu, pool_rows=395_000 if "math" in name else 100_000, tokens_per_row=300,
                     sae_width=65536 if "qwen" in name else None)
            tight = min(p.stages, key=lambda s: (s.have_bytes - s.need_bytes) if s.gpus_per_actor else 1e30)
            by = {s.stage: s for s in p.stages}
            rows.append(f"| {name} | {gpu} | {'yes' if p.fits else 'NO'} | {tight.stage} "
                        f"{tight.need_bytes / 2**30:.1f} / {tight.have_bytes / 2**30:.1f} | "
                        f"{by['finetune'].need_bytes / 2**30:.1f} | {sum(s.gpu_seconds for s in p.stages) / 3600:,.1f} | "
                        f"{sum(s.cost for s in p.stages):,.0f} | {p.roi.get('net_gpu_h', float('nan')):+,.1f} |")
            full.append(f"### {name} on {gpu}\n\n{render(p)}\n")
    print("| config | GPU | fits | tightest stage: GiB needed / available per actor | fine-tune GiB per worker | "
          "GPU-h | cost ($) | IGDS net GPU-h saved |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print()
    print("\n".join(full))


if __name__ == "__main__":
    main()
