"""
Writes inception_pool3_known_answer.npz beside this file: pool3 features of the synthetic images of
tests/test_inception.py (known_answer_image), computed by pytorch-fid's own InceptionV3 -- its network,
its resize and its normalisation -- so the stored numbers do not come from inception.py.

pytorch-fid fetches its weights from a URL; here that call is pointed at a local file instead.
Run once, in a scratch venv with pytorch-fid, torchvision and pytest besides the project's requirements:
    VENV/bin/python tests/data/make_inception_known_answer.py WEIGHTS.pth
"""
import datetime
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytorch_fid
import torch
import torchvision
from pytorch_fid import inception as pytorch_fid_inception

HERE = Path(__file__).resolve().parent
SIZES = (64, 299)   # 64: through the bilinear resize; 299: the network alone


def reference_features(weights: str, images: list[torch.Tensor]) -> np.ndarray:
    state = torch.load(weights, map_location="cpu", weights_only=True)
    pytorch_fid_inception.load_state_dict_from_url = lambda *args, **kwargs: state
    net = pytorch_fid_inception.InceptionV3([pytorch_fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]],
                                            resize_input=True, normalize_input=True).eval()
    with torch.no_grad():
        return np.concatenate([net(im.float() / 255)[0].flatten(1).numpy() for im in images])  # (K, 2048)


def main(weights: str) -> None:
    sys.path[:0] = [str(HERE.parent), str(HERE.parents[1])]   # tests/ for the formula, the repo it imports
    from test_inception import known_answer_image
    images = [known_answer_image(s) for s in SIZES]
    features = reference_features(weights, images)
    provenance = {"reference": f"pytorch-fid {pytorch_fid.__version__} InceptionV3 (use_fid_inception, "
                               f"resize_input, normalize_input), pool3 block",
                  "torch": torch.__version__, "torchvision": torchvision.__version__,
                  "weights_sha256": hashlib.sha256(Path(weights).read_bytes()).hexdigest(),
                  "date": datetime.date.today().isoformat()}
    np.savez(HERE / "inception_pool3_known_answer.npz", sizes=np.array(SIZES),
             image_sha256=np.array([hashlib.sha256(im.numpy().tobytes()).hexdigest() for im in images]),
             features=features.astype(np.float32), provenance=np.array(json.dumps(provenance)))
    print(json.dumps(provenance, indent=1), "\nfeature range", features.min(), features.max())


if __name__ == "__main__":
    main(sys.argv[1])
