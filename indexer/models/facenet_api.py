"""What faceindex uses of facenet-pytorch beyond its public API, in one place.

facenet-pytorch's public API is ``MTCNN`` and ``InceptionResnetV1``. The fast CPU detector (``mtcnn_fast``) and the
cropping (``detector``) also call helpers of ``facenet_pytorch.models.utils.detect_face`` that the package does not
document, and read the networks' layers by name. A release may rename or drop any of them; the names are listed
here, imported from here only, and ``tests/test_facenet_api.py`` fails naming the missing one after an upgrade
(``make install`` pins facenet-pytorch, see requirements.lock).
"""

from __future__ import annotations

import importlib

from indexer.errors import DependencyError

DETECT_FACE = "facenet_pytorch.models.utils.detect_face"
# detect_face's undocumented helpers we call: who calls them, for what.
HELPERS: dict[str, str] = {
    "extract_face": "detector: cut a face crop with a margin and resize it to 160 px",
    "batched_nms_numpy": "mtcnn_fast: ONet's final per-image NMS ('Min')",
    "bbreg": "mtcnn_fast: box regression after RNet and ONet",
    "fixed_batch_process": "mtcnn_fast: RNet/ONet over candidates in fixed batches",
    "generateBoundingBox": "mtcnn_fast: PNet's score map -> candidate boxes",
    "pad": "mtcnn_fast: the crop windows of candidate boxes, clipped to the image",
    "rerec": "mtcnn_fast: candidate boxes made square",
    "imresample": "tests: the reference pyramid resize mtcnn_fast's is held equal to",
}
# Attributes of MTCNN and its networks that mtcnn_fast and detector read (network -> attribute names).
NETWORK_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "MTCNN": ("pnet", "rnet", "onet", "min_face_size", "thresholds", "factor"),
    "PNet": ("conv1", "prelu1", "pool1", "conv2", "prelu2", "conv3", "prelu3", "conv4_1", "conv4_2"),
}


def helper(name: str):
    """detect_face's ``name``, or one line saying which facenet-pytorch would have it."""
    if name not in HELPERS:
        raise KeyError(f"{name} is not listed in facenet_api.HELPERS")
    try:
        module = importlib.import_module(DETECT_FACE)
    except ImportError as exc:
        raise DependencyError(f"facenet-pytorch cannot be imported ({exc}); run `make install`") from None
    found = getattr(module, name, None)
    if found is None:
        raise DependencyError(f"this facenet-pytorch has no {DETECT_FACE}.{name}, which faceindex calls; "
                           "install the version requirements.lock pins (`make install`)")
    return found


def missing() -> list[str]:
    """Every listed helper or network attribute the installed facenet-pytorch lacks, as a dotted name."""
    gone = []
    for name in HELPERS:
        try:
            helper(name)
        except DependencyError:
            gone.append(f"{DETECT_FACE}.{name}")
    from facenet_pytorch import MTCNN

    mtcnn = MTCNN(device="cpu")
    for owner, attributes in NETWORK_ATTRIBUTES.items():
        obj = mtcnn if owner == "MTCNN" else mtcnn.pnet
        gone += [f"{owner}.{a}" for a in attributes if not hasattr(obj, a)]
    return gone
