"""In-tree PEP 517 backend: setuptools, plus the start-up files at the wheel's root.

Both ``pip install .`` (build_wheel) and ``pip install -e .`` (build_editable) go through
here, so the hook is installed either way. The files sit next to the packages in
site-packages, where ``site`` looks for them:

* ``mlx_arch_plugins.pth``: an ``import`` line, run by Python < 3.15 (and by 3.15+ only
  when the ``.start`` file is missing);
* ``mlx_arch_plugins.start``: the PEP 829 entry point run by Python >= 3.15, which then
  ignores the import line of the ``.pth`` of the same name.
"""

import base64
import hashlib
import os
import zipfile

from setuptools import build_meta as _orig
from setuptools.build_meta import *  # noqa: F401,F403  (the hooks we do not change)

# Guarded so that a half-removed installation never prints a traceback at start-up.
PTH = (
    'import sys; exec("try:\\n import mlx_arch_plugins.host.hook as h; h._startup()\\n'
    'except Exception:\\n pass")\n'
)
START = "mlx_arch_plugins.host.hook:_startup\n"
STARTUP_FILES = {"mlx_arch_plugins.pth": PTH, "mlx_arch_plugins.start": START}


def _record_line(name, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"{name},sha256={digest.decode()},{len(data)}\n"


def _add_startup_files(wheel_path):
    with zipfile.ZipFile(wheel_path) as wheel:
        items = [(info, wheel.read(info)) for info in wheel.infolist()]
    record = next(info for info, _ in items if info.filename.endswith(".dist-info/RECORD"))
    tmp = wheel_path + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        record_text = ""
        for info, data in items:
            if info is record:
                record_text = data.decode()
            elif info.filename not in STARTUP_FILES:
                out.writestr(info, data)
        for name, text in STARTUP_FILES.items():
            data = text.encode()
            out.writestr(name, data)
            record_text += _record_line(name, data)
        out.writestr(record, record_text.encode())  # RECORD stays last
    os.replace(tmp, wheel_path)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = _orig.build_wheel(wheel_directory, config_settings, metadata_directory)
    _add_startup_files(os.path.join(wheel_directory, name))
    return name


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    name = _orig.build_editable(wheel_directory, config_settings, metadata_directory)
    _add_startup_files(os.path.join(wheel_directory, name))
    return name
