"""Build hook: generate the teaserve.v1 message and gRPC stubs from the repository's protos.

The stubs are never committed or hand-written: `pip install clients/python` runs grpcio-tools'
protoc on ../../proto/teaserve/v1/*.proto and packages the output as `teaserve.v1`. An editable
install (`pip install -e clients/python`) imports the package from src/, so there the stubs are
written to src/teaserve/v1 (ignored by git); rerun the install after the protos change.
"""

import os
import pathlib

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = pathlib.Path(os.environ.get("TEASERVE_PROTO_ROOT", HERE.parent.parent / "proto"))


def generate(out_dir: pathlib.Path) -> None:
    from grpc_tools import protoc  # a build requirement (pyproject.toml)
    import grpc_tools

    protos = sorted((PROTO_ROOT / "teaserve" / "v1").glob("*.proto"))
    if not protos:
        raise SystemExit(
            f"no .proto files under {PROTO_ROOT}/teaserve/v1; build from a teaserve checkout "
            "or set TEASERVE_PROTO_ROOT"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on " + ", ".join(p.name for p in protos))
    (out_dir / "teaserve" / "v1" / "__init__.py").write_text(
        '"""Generated from proto/teaserve/v1 by grpcio-tools at build time."""\n'
    )


class BuildWithStubs(build_py):
    """build_py that also writes the generated stubs: into the build tree for a regular
    install, next to the sources (src/) for an editable one, which imports from there."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            generate(HERE / "src")
        else:
            generate(pathlib.Path(self.build_lib))


setup(cmdclass={"build_py": BuildWithStubs})
