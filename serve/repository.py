"""The model repository, in Triton's layout.

    models/
      <name>/
        config.pbtxt            ModelConfig in protobuf text format (Triton reads it unchanged)
        labels.txt              one class name per line (output label_filename)
        <version>/model.onnx    platform onnxruntime_onnx
        <version>/model.plan    platform tensorrt_plan (+ model.plan.json: build metadata)
        <version>/model.keras   backend "keras" (Kestrel only: the original Keras path)
      <ensemble>/
        config.pbtxt            platform "ensemble": Triton's ensemble_scheduling steps name the
                                members; parameters "fusion" and "temperatures" say how Kestrel
                                fuses them (EnsembleEntry; serve.ensemble.Ensemble.from_entry)

Every Kestrel model takes one uint8 NHWC image batch and returns FP32 class
probabilities; `ModelEntry.input_spec` / `output_spec` describe them.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import text_format

from . import datatypes, images
from ._files import read_error, write_text_atomic
from .errors import ConfigError, ModelNotFoundError

# platform / backend name -> artifact file name
PLATFORM_ONNX = "onnxruntime_onnx"
PLATFORM_TENSORRT = "tensorrt_plan"
BACKEND_KERAS = "keras"
PLATFORM_ENSEMBLE = "ensemble"  # an ensemble folder: no artifact, members in ensemble_scheduling
PLATFORM_FAKE = "fake"  # serve/backends/fake.py: deterministic, dependency-free (tests, load tests)
ARTIFACTS = {
    PLATFORM_ONNX: "model.onnx",
    PLATFORM_TENSORRT: "model.plan",
    BACKEND_KERAS: "model.keras",
    PLATFORM_FAKE: "model.json",
}
CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"
DEFAULT_MAX_BATCH_SIZE = 32
# config.pbtxt parameter naming how images are resized for this model (serve.images.RESIZE_MODES):
#   parameters { key: "resize" value { string_value: "crop" } }
# absent = "stretch" (what every model exported before the parameter existed was validated with)
RESIZE_PARAMETER = "resize"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def _pb():
    try:
        from ._proto import model_config_pb2
    except ImportError as exc:  # pragma: no cover - only on a checkout where `make proto` never ran
        raise ImportError(
            "serve/_proto has no generated code; run `make proto` (or `make install`) first"
        ) from exc
    return model_config_pb2


def validate_name(name: str) -> str:
    """A model name must be one plain folder name: no separators, no '..', no hidden files."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in {".", ".."}:
        raise ConfigError(
            f"invalid model name {name!r}: expected letters, digits, '_', '-', '.', starting with a "
            "letter or digit (a name must stay inside the repository folder)"
        )
    return name


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a model's contract. `shape` excludes the batch dimension; -1 is dynamic."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def datatype(self) -> str:
        """The V2 protocol datatype string ("UINT8", "FP32")."""
        return datatypes.to_v2(self.dtype)


def make_config(
    name: str,
    platform: str,
    input_spec: TensorSpec,
    output_spec: TensorSpec,
    *,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    labels: bool = True,
    max_queue_delay_us: int = 2000,
    max_queue_size: int = 256,
    instance_count: int = 1,
    parameters: dict[str, str] | None = None,
    resize: str | None = None,
):
    """Build a ModelConfig for an image classifier (batch dim excluded from dims, as Triton wants).

    `resize` (serve.images.RESIZE_MODES) is recorded as the "resize" parameter.
    """
    pb = _pb()
    validate_name(name)
    if platform not in ARTIFACTS:
        raise ConfigError(f"unknown platform {platform!r}; expected one of {sorted(ARTIFACTS)}")
    config = pb.ModelConfig(name=name, max_batch_size=max_batch_size)
    if platform == BACKEND_KERAS:
        config.backend = BACKEND_KERAS
        config.default_model_filename = ARTIFACTS[BACKEND_KERAS]
    else:
        config.platform = platform
    inp = config.input.add(
        name=input_spec.name, data_type=pb.DataType.Value(datatypes.to_config(input_spec.dtype))
    )
    if len(input_spec.shape) == 3:
        inp.format = pb.ModelInput.FORMAT_NHWC
    inp.dims.extend(input_spec.shape)
    out = config.output.add(
        name=output_spec.name, data_type=pb.DataType.Value(datatypes.to_config(output_spec.dtype))
    )
    out.dims.extend(output_spec.shape)
    if labels:
        out.label_filename = LABELS_FILE
    config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    config.dynamic_batching.default_queue_policy.max_queue_size = max_queue_size
    group = config.instance_group.add(count=instance_count)
    group.kind = pb.ModelInstanceGroup.KIND_GPU if platform == PLATFORM_TENSORRT else pb.ModelInstanceGroup.KIND_CPU
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = str(value)
    if resize is not None:
        config.parameters[RESIZE_PARAMETER].string_value = images.check_mode(resize)
    return config


def write_config(config, folder: Path) -> Path:
    """Write config.pbtxt into `folder` atomically (serve._files); returns its path."""
    return write_text_atomic(Path(folder) / CONFIG_FILE, text_format.MessageToString(config))


def read_config(path: Path):
    """Parse a config.pbtxt; a syntax error names the file and the line."""
    pb = _pb()
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(read_error(path, exc)) from None
    try:
        return text_format.Parse(text, pb.ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"{path}: invalid model configuration: {exc}") from None


def _spec(tensor) -> TensorSpec:
    pb = _pb()
    return TensorSpec(tensor.name, datatypes.from_config(pb.DataType.Name(tensor.data_type)), tuple(tensor.dims))


@dataclass
class ModelEntry:
    """One model folder of the repository, parsed and checked (artifacts are not loaded)."""

    name: str
    path: Path
    config: object  # inference.ModelConfig

    @property
    def platform(self) -> str:
        """'onnxruntime_onnx', 'tensorrt_plan' or 'keras'."""
        return self.config.platform or self.config.backend

    @property
    def max_batch_size(self) -> int:
        return int(self.config.max_batch_size)

    # an entry's config is not changed once loaded (a new load makes a new entry): its specs are read once,
    # not on each of the several reads every request makes
    @functools.cached_property
    def input_spec(self) -> TensorSpec:
        return _spec(self.config.input[0])

    @functools.cached_property
    def output_spec(self) -> TensorSpec:
        return _spec(self.config.output[0])

    @property
    def parameters(self) -> dict[str, str]:
        return {k: v.string_value for k, v in self.config.parameters.items()}

    @property
    def resize(self) -> str:
        """How images are resized for this model: "stretch" (also when unset) or "crop"."""
        return images.check_mode(self.parameters.get(RESIZE_PARAMETER) or images.STRETCH)

    @property
    def versions(self) -> list[int]:
        """Numeric version folders that hold this platform's artifact, ascending."""
        found = []
        try:
            children = list(self.path.iterdir())
        except OSError as exc:
            raise ConfigError(read_error(self.path, exc)) from None
        for child in children:
            if child.name.isdigit() and child.is_dir():
                artifact = child / self.artifact_name
                try:
                    if artifact.is_file():
                        found.append(int(child.name))
                except OSError as exc:  # a version folder this user may not enter: say so, not "no version"
                    raise ConfigError(read_error(artifact, exc)) from None
        return sorted(found)

    def policy_versions(self) -> list[int]:
        """The versions its version_policy serves (Triton's rules): the latest `num_versions` (default 1)
        of those on disk, all of them, or the `specific` ones (each must be on disk)."""
        available = self.versions
        policy = self.config.version_policy
        kind = policy.WhichOneof("policy_choice")
        if kind == "all":
            return available
        if kind == "specific":
            wanted = sorted(set(int(v) for v in policy.specific.versions))
            missing = [v for v in wanted if v not in available]
            if not wanted:
                raise ConfigError(f"model '{self.name}': version_policy specific names no versions")
            if missing:
                raise ConfigError(f"model '{self.name}': version_policy names version(s) {missing}, which have no "
                                  f"{self.artifact_name} in {self.path} (on disk: {available or 'none'})")
            return wanted
        count = int(policy.latest.num_versions) if kind == "latest" else 1
        return available[-max(1, count):]

    def version_files(self, version: int) -> list[Path]:
        """Every file of one version folder (what decides whether a version changed), sorted."""
        folder = self.path / str(version)
        return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))

    @property
    def artifact_name(self) -> str:
        return self.config.default_model_filename or ARTIFACTS[self.platform]

    def artifact(self, version: int | None = None) -> Path:
        """Path of the artifact for `version` (the latest when None)."""
        versions = self.versions
        if not versions:
            raise ModelNotFoundError(
                f"model '{self.name}' has no version folder with {self.artifact_name} in {self.path}"
            )
        if version is None:
            version = versions[-1]
        if version not in versions:
            raise ModelNotFoundError(
                f"model '{self.name}' has no version {version}; available versions: {versions}"
            )
        return self.path / str(version) / self.artifact_name

    def labels(self) -> list[str] | None:
        """Class names from the output's label file, or None when the model has none."""
        label_file = self.config.output[0].label_filename
        if not label_file:
            return None
        path = self.path / label_file
        if not path.is_file():
            raise ConfigError(f"{self.path / CONFIG_FILE} names label file {label_file!r}, which does not exist")
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(read_error(path, exc)) from None
        return [line.rstrip("\n") for line in text.splitlines()]


def config_from_json(text: str, name: str):
    """A ModelConfig from its JSON form (the repository load API's "config" parameter, as Triton takes it)."""
    from google.protobuf import json_format

    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"model '{name}': received an empty \"config\" parameter; expected a JSON model "
                          "configuration (ModelConfig)")
    try:
        return json_format.Parse(text, _pb().ModelConfig())
    except json_format.ParseError as exc:
        raise ConfigError(f"model '{name}': the \"config\" parameter is not a valid model configuration: "
                          f"{str(exc)[:300]}") from None


def load_entry(folder: Path, config=None) -> ModelEntry:
    """Parse and check one model folder (`config`: a ModelConfig that replaces its config.pbtxt)."""
    folder = Path(folder)
    if config is None:
        config = read_config(folder / CONFIG_FILE)
    name = config.name or folder.name
    if name != folder.name:
        raise ConfigError(f"{folder / CONFIG_FILE}: name {name!r} does not match its folder {folder.name!r}")
    platform = config.platform or config.backend
    if platform == PLATFORM_ENSEMBLE:
        raise ConfigError(f"{folder / CONFIG_FILE} is an ensemble (platform \"ensemble\"), not a model; "
                          "its members are served and fused (ModelRepository.ensemble)")
    if platform not in ARTIFACTS:
        raise ConfigError(
            f"{folder / CONFIG_FILE}: platform/backend {platform!r} is not supported; "
            f"expected one of {sorted(ARTIFACTS)}"
        )
    if len(config.input) != 1 or len(config.output) != 1:
        raise ConfigError(
            f"{folder / CONFIG_FILE}: expected exactly one input and one output, "
            f"got {len(config.input)} inputs and {len(config.output)} outputs"
        )
    entry = ModelEntry(name=name, path=folder, config=config)
    try:
        entry.resize
    except ConfigError as exc:
        raise ConfigError(f"{folder / CONFIG_FILE}: parameter {RESIZE_PARAMETER!r}: {exc}") from None
    return entry


def _has_config(folder: Path) -> bool:
    """Does `folder` hold a config.pbtxt? A folder this user may not enter counts (loading it then says
    which permission is missing) rather than vanishing from the repository."""
    try:
        return (folder / CONFIG_FILE).is_file()
    except PermissionError:
        return folder.is_dir()


class ModelRepository:
    """A folder of model folders. Cheap to construct; entries are parsed on demand."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def _folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        try:
            children = list(self.root.iterdir())
        except OSError as exc:
            raise ConfigError(read_error(self.root, exc)) from None
        return sorted((p for p in children if _has_config(p)), key=lambda p: p.name)

    def folder_names(self) -> list[str]:
        """Names of every model and ensemble folder (a config.pbtxt), sorted: one look, no config read."""
        return [p.name for p in self._folders()]

    def names(self) -> list[str]:
        """Names of all model folders (a config.pbtxt that is not an ensemble's), sorted."""
        return [p.name for p in self._folders() if not is_ensemble_folder(p)]

    def ensemble_names(self) -> list[str]:
        """Names of the ensemble folders (config.pbtxt with platform "ensemble"), sorted."""
        return [p.name for p in self._folders() if is_ensemble_folder(p)]

    def ensemble(self, name: str) -> "EnsembleEntry":
        folder = self.folder(name)
        if not is_ensemble_folder(folder):
            known = ", ".join(self.ensemble_names()) or "none"
            raise ModelNotFoundError(f"ensemble '{name}' is not in repository {self.root} (ensembles there: {known})")
        return load_ensemble(folder)

    def folder(self, name: str) -> Path:
        """The folder a model of this name lives (or would live) in; rejects names escaping the root."""
        return self.root / validate_name(name)

    def entry(self, name: str, config=None) -> ModelEntry:
        """The model `name`, parsed and checked (`config`: a ModelConfig used instead of its config.pbtxt)."""
        folder = self.folder(name)
        if not _has_config(folder) and config is None:
            known = ", ".join(self.names()) or "none"
            raise ModelNotFoundError(f"model '{name}' is not in repository {self.root} (models there: {known})")
        return load_entry(folder, config)

    def entries(self) -> list[ModelEntry]:
        return [self.entry(name) for name in self.names()]


# ---- ensembles ---------------------------------------------------------------------------------
FUSION_PARAMETER = "fusion"
TEMPERATURES_PARAMETER = "temperatures"  # "member=1.31,other=0.92" (members left out: 1.0)
_PLATFORM_RE = re.compile(r'^\s*platform\s*:\s*"ensemble"', re.MULTILINE)


def is_ensemble_folder(folder: Path) -> bool:
    """Does `folder`/config.pbtxt declare platform "ensemble"? (a cheap text check, no parsing)"""
    try:
        return bool(_PLATFORM_RE.search((Path(folder) / CONFIG_FILE).read_text()))
    except (OSError, UnicodeDecodeError):
        return False


@dataclass
class EnsembleEntry:
    """One ensemble folder, parsed: its members (the steps' models), fusion and temperatures."""

    name: str
    path: Path
    config: object  # inference.ModelConfig
    members: tuple[str, ...]
    fusion: str | None  # None: the server's default
    temperatures: dict[str, float] | None


def parse_temperatures(text: str, source: str = "temperatures") -> dict[str, float]:
    """'a=1.3,b=0.9' -> {'a': 1.3, 'b': 0.9}; ConfigError naming `source` otherwise."""
    out: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        member, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[member.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"{source}: received {item!r}; expected MEMBER=TEMPERATURE items separated "
                              "by commas (e.g. mobilenet=1.4,mobilenet_v2=1.1)") from None
    return out


def load_ensemble(folder: Path) -> EnsembleEntry:
    """Parse and check one ensemble folder (members must be plain model names; no duplicates)."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    config = read_config(path)
    name = config.name or folder.name
    if name != folder.name:
        raise ConfigError(f"{path}: name {name!r} does not match its folder {folder.name!r}")
    if config.platform != PLATFORM_ENSEMBLE:
        raise ConfigError(f"{path}: platform {config.platform!r} is not an ensemble; expected \"ensemble\"")
    steps = list(config.ensemble_scheduling.step)
    if not steps:
        raise ConfigError(f"{path}: an ensemble needs ensemble_scheduling {{ step {{ model_name: ... }} }}, "
                          "one step per member; found none")
    members = []
    for step in steps:
        try:
            members.append(validate_name(step.model_name))
        except ConfigError as exc:
            raise ConfigError(f"{path}: step model_name: {exc}") from None
    if len(set(members)) != len(members):
        raise ConfigError(f"{path}: a member is named twice: {members}")
    params = {k: v.string_value for k, v in config.parameters.items()}
    temperatures = None
    if params.get(TEMPERATURES_PARAMETER, "").strip():
        temperatures = parse_temperatures(params[TEMPERATURES_PARAMETER], f"{path}: parameter 'temperatures'")
        unknown = sorted(set(temperatures) - set(members))
        if unknown:
            raise ConfigError(f"{path}: parameter 'temperatures' names {unknown}, which are not steps of the "
                              f"ensemble ({', '.join(members)})")
    return EnsembleEntry(name, folder, config, tuple(members), params.get(FUSION_PARAMETER) or None, temperatures)


def make_ensemble_config(name: str, members, *, fusion: str | None = None,
                         temperatures: dict[str, float] | None = None, input_name: str = "images",
                         output_name: str = "probabilities"):
    """A Triton-layout ensemble ModelConfig: one step per member, Kestrel's fusion in parameters."""
    pb = _pb()
    validate_name(name)
    config = pb.ModelConfig(name=name, platform=PLATFORM_ENSEMBLE)
    for member in members:
        step = config.ensemble_scheduling.step.add(model_name=validate_name(member), model_version=-1)
        step.input_map[input_name] = input_name
        step.output_map[output_name] = f"{member}_{output_name}"
    if fusion:
        config.parameters[FUSION_PARAMETER].string_value = fusion
    if temperatures:
        config.parameters[TEMPERATURES_PARAMETER].string_value = ",".join(
            f"{m}={float(t):.6g}" for m, t in temperatures.items())
    return config


def write_ensemble(root: Path | str, name: str, members, *, fusion: str | None = None,
                   temperatures: dict[str, float] | None = None) -> Path:
    """Write (or replace, atomically) the ensemble folder `root`/`name`; returns its config path.
    A model folder of that name is never overwritten."""
    folder = Path(root) / validate_name(name)
    if (folder / CONFIG_FILE).is_file() and not is_ensemble_folder(folder):
        raise ConfigError(f"{folder} holds a model, not an ensemble; choose another ensemble name")
    (folder / "1").mkdir(parents=True, exist_ok=True)  # Triton wants a version folder, even empty
    return write_config(make_ensemble_config(name, members, fusion=fusion, temperatures=temperatures), folder)
