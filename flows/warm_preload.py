"""What the warm runner's fork server (flows/warm_runner.py) does once, before it forks any
scan: import the modules a scan uses and do the one-time work each scan would otherwise repeat
in its own process (compiling the report template)."""

import gc
import mimetypes

import anyio._backends._asyncio  # noqa: F401  (the modules below: what a forked scan imported on its
import encodings.cp437  # noqa: F401            first flow run; 0.3 s of CPU in every scan when left to it)
import jinja2  # noqa: F401
import mlflow  # noqa: F401
import mlflow.tracking.request_header.registry  # noqa: F401
import netrc  # noqa: F401
import onnx  # noqa: F401
import onnxruntime  # noqa: F401
import PIL.Image
import prefect.flow_engine  # noqa: F401
import prefect.utilities.visualization  # noqa: F401
import rich._emoji_codes  # noqa: F401
import torch  # noqa: F401

import flows.scan_version  # noqa: F401
import scanner.detectors  # noqa: F401
import scanner.gate  # noqa: F401
import scanner.model_io  # noqa: F401
import scanner.registry  # noqa: F401
import scanner.scan  # noqa: F401
import scanner.training  # noqa: F401
from scanner.onnx_loading import _import_onnx2torch
from scanner.report import report_template

PIL.Image.init()  # registers every image plugin: saving the PNGs would load them one by one
mimetypes.init()  # read once here, not by every scan's first artifact upload
report_template()
_import_onnx2torch()  # onnx2torch needs a stand-in for torchvision: set up once here

# Move everything imported so far out of the garbage collector's sight: a collection in a forked
# scan would otherwise write to every object header and copy the fork server's memory page by page.
gc.freeze()
