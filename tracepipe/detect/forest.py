"""A fitted IsolationForest as plain arrays: saved to an `.npz` that numpy reads with `allow_pickle=False`, so
loading a model can never run code (a pickle or joblib file planted in the lake did: issue #12).

`Forest.from_sklearn` takes what scikit-learn learned (each tree's children, split feature and threshold,
training samples per node, plus max_samples and offset); `Forest.score_samples` computes exactly what
`IsolationForest.score_samples` computes (same float32 comparison, same per-tree sum order), so scores do not
change by being stored. `read` checks every header before it reads an array (no huge allocation from a
planted file), then the tree structure (each node one parent, children after their parent, features and
thresholds in range), and refuses anything else with a ModelError that says how to refit.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tracepipe.errors import InputError

FORMAT_VERSION = 1
MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_TREES = 10_000
MAX_NODES = 20_000_000  # all trees together (200 trees of 256 samples: ~100,000)
MAX_FEATURES = 10_000
ROW_CHUNK = 1024  # rows scored at once: the (rows, trees) node arrays, ~1.6 MiB for 200 trees, stay in cache
# (4096 rows, ~6 MiB: 0.8 s CPU to score 24,000 rows here, 1024 rows: 0.5-0.65 s; same scores)

# name -> (dtype, number of dimensions); shapes are checked against each other in _check
ARRAYS: dict[str, tuple[np.dtype, int]] = {
    "format_version": (np.dtype("<i8"), 0),
    "n_features": (np.dtype("<i8"), 0),
    "max_samples": (np.dtype("<i8"), 0),
    "offset": (np.dtype("<f8"), 0),
    "node_offsets": (np.dtype("<i8"), 1),  # tree t holds nodes node_offsets[t]:node_offsets[t + 1]
    "children_left": (np.dtype("<i8"), 1),  # index within the tree, -1 at a leaf
    "children_right": (np.dtype("<i8"), 1),
    "feature": (np.dtype("<i8"), 1),  # column of the input matrix (already mapped through the tree's subset)
    "threshold": (np.dtype("<f8"), 1),
    "missing_go_to_left": (np.dtype("u1"), 1),
    "n_node_samples": (np.dtype("<i8"), 1),
}
REFIT = "refit it with `tracepipe model fit --since ... --until ...`"


class ModelError(InputError):
    """A model file that is not one tracepipe wrote (old joblib/pickle, altered, truncated): never loaded."""


def average_path_length(n: np.ndarray) -> np.ndarray:
    """c(n) of the IsolationForest paper, as scikit-learn computes it (sklearn.ensemble._iforest)."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros(n.shape)
    two = n == 2
    many = n > 2
    out[two] = 1.0
    out[many] = 2.0 * (np.log(n[many] - 1.0) + np.euler_gamma) - 2.0 * (n[many] - 1.0) / n[many]
    return out


@dataclass(frozen=True)
class Forest:
    """The arrays of ARRAYS; children are global indices into the node arrays (-1 at a leaf)."""

    n_features: int
    max_samples: int
    offset: float
    node_offsets: np.ndarray
    children_left: np.ndarray
    children_right: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    missing_go_to_left: np.ndarray
    n_node_samples: np.ndarray

    @property
    def n_estimators(self) -> int:
        return len(self.node_offsets) - 1

    @classmethod
    def from_sklearn(cls, forest: Any) -> Forest:
        """The arrays of a fitted sklearn IsolationForest."""
        subsample = forest._max_features != forest.n_features_in_  # as sklearn's score_samples decides
        parts: dict[str, list[np.ndarray]] = {
            k: [] for k in ARRAYS if k not in _SCALARS and k != "node_offsets"
        }
        offsets = [0]
        for estimator, features in zip(forest.estimators_, forest.estimators_features_, strict=True):
            tree = estimator.tree_
            leaf = tree.children_left == -1
            column = np.where(leaf, -2, tree.feature)
            if subsample:
                column = np.where(leaf, -2, np.asarray(features)[np.maximum(tree.feature, 0)])
            parts["children_left"].append(tree.children_left.astype(np.int64))
            parts["children_right"].append(tree.children_right.astype(np.int64))
            parts["feature"].append(column.astype(np.int64))
            parts["threshold"].append(tree.threshold.astype(np.float64))
            parts["missing_go_to_left"].append(np.asarray(tree.missing_go_to_left, dtype=np.uint8))
            parts["n_node_samples"].append(tree.n_node_samples.astype(np.int64))
            offsets.append(offsets[-1] + tree.node_count)
        arrays = {k: np.concatenate(v) for k, v in parts.items()}
        return cls._from_local(
            {
                **arrays,
                "node_offsets": np.asarray(offsets, dtype=np.int64),
                "n_features": forest.n_features_in_,
                "max_samples": forest._max_samples,
                "offset": forest.offset_,
            }
        )

    @classmethod
    def _from_local(cls, arrays: dict[str, Any]) -> Forest:
        """Children as stored (per tree, -1 at a leaf) -> global indices."""
        offsets = arrays["node_offsets"]
        base = np.repeat(offsets[:-1], np.diff(offsets))
        left, right = arrays["children_left"], arrays["children_right"]
        return cls(
            n_features=int(arrays["n_features"]),
            max_samples=int(arrays["max_samples"]),
            offset=float(arrays["offset"]),
            node_offsets=offsets,
            children_left=np.where(left == -1, -1, left + base),
            children_right=np.where(right == -1, -1, right + base),
            feature=arrays["feature"],
            threshold=arrays["threshold"],
            missing_go_to_left=arrays["missing_go_to_left"].astype(bool),
            n_node_samples=arrays["n_node_samples"],
        )

    def _local(self) -> dict[str, np.ndarray]:
        base = np.repeat(self.node_offsets[:-1], np.diff(self.node_offsets))
        return {
            "format_version": np.asarray(FORMAT_VERSION, dtype=np.int64),
            "n_features": np.asarray(self.n_features, dtype=np.int64),
            "max_samples": np.asarray(self.max_samples, dtype=np.int64),
            "offset": np.asarray(self.offset, dtype=np.float64),
            "node_offsets": self.node_offsets.astype(np.int64),
            "children_left": np.where(self.children_left == -1, -1, self.children_left - base),
            "children_right": np.where(self.children_right == -1, -1, self.children_right - base),
            "feature": self.feature.astype(np.int64),
            "threshold": self.threshold.astype(np.float64),
            "missing_go_to_left": self.missing_go_to_left.astype(np.uint8),
            "n_node_samples": self.n_node_samples.astype(np.int64),
        }

    # -- scoring, as sklearn.ensemble.IsolationForest
    def _leaf_path_lengths(self) -> np.ndarray:
        """Per node: its depth (root 1, as sklearn's compute_node_depths) + c(samples in it) - 1."""
        depth = np.zeros(len(self.feature), dtype=np.int64)
        frontier = self.node_offsets[:-1]
        level = 1
        while frontier.size:  # one step per tree level (~9 for 256 samples); _check made it a tree
            depth[frontier] = level
            children = np.concatenate([self.children_left[frontier], self.children_right[frontier]])
            frontier = children[children != -1]
            level += 1
        return depth + average_path_length(self.n_node_samples) - 1.0

    def score_samples(self, x: np.ndarray) -> np.ndarray:
        """= IsolationForest.score_samples(x): minus the paper's anomaly score (lower = more abnormal)."""
        x = np.asarray(x, dtype=np.float32)  # sklearn validates to float32, then compares in double
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected a matrix of {self.n_features} columns, got shape {x.shape}")
        path = self._leaf_path_lengths()
        roots = self.node_offsets[:-1]
        depths = np.zeros(len(x))
        feature = np.maximum(self.feature, 0)
        trees = len(roots)
        # The walk below is the sweep's anomaly stage (~1.5 s CPU at 10^7 flows): its steps are one gather each
        # where they were several. Both children of a node side by side (a step: children[2 * node + right]),
        # whether each node is internal (one lookup, no compare), and each walking pair's row offset into the
        # flattened matrix kept beside it (no division per step); NaN handled only in a chunk that has one.
        children = np.stack([self.children_left, self.children_right], axis=1).reshape(-1)
        internal = self.children_left != -1
        for start in range(0, len(x), ROW_CHUNK):
            rows = x[start : start + ROW_CHUNK].astype(np.float64)
            flat = rows.reshape(-1)
            nan = bool(np.isnan(flat).any())
            # every (row, tree) walks down from its root; only the pairs still at an internal node are
            # stepped (most reach a leaf well before the deepest does): the same leaves, less work
            node = np.tile(roots, len(rows))  # (row, tree) in row order
            walking = np.flatnonzero(internal[node])
            base = walking // trees * self.n_features
            while walking.size:
                at = node[walking]
                value = flat[base + feature[at]]
                right = ~(value <= self.threshold[at])
                if nan:
                    right = np.where(np.isnan(value), ~self.missing_go_to_left[at], right)
                step = children[2 * at + right]
                node[walking] = step
                going = internal[step]
                walking, base = walking[going], base[going]
            leaf_lengths = path[node.reshape(len(rows), trees)]
            chunk = np.zeros(len(rows))
            for tree in range(leaf_lengths.shape[1]):  # tree by tree, the order sklearn adds them in
                chunk += leaf_lengths[:, tree]
            depths[start : start + len(rows)] = chunk
        denominator = self.n_estimators * average_path_length(np.asarray([self.max_samples]))
        return -(2 ** (-np.divide(depths, denominator, out=np.ones_like(depths), where=denominator != 0)))

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        return self.score_samples(x) - self.offset


_SCALARS = ("format_version", "n_features", "max_samples", "offset")


def write(forest: Forest, path: Path) -> None:
    """The forest's arrays to `path` (an .npz; numpy's own zip of .npy files, no pickled objects)."""
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **forest._local())


def read(path: Path) -> Forest:
    """The forest of an .npz that `write` wrote; ModelError for anything else (never unpickled)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read the model {path}: {exc.strerror or exc}") from exc
    if magic != b"PK\x03\x04":
        pickled = magic[:1] == b"\x80"  # pickle protocol 2+: what joblib and pickle write
        old = (
            " (an old joblib/pickle model, which tracepipe no longer loads: it could run code)"
            if pickled
            else ""
        )
        raise ModelError(f"{path} is not a tracepipe model file{old}; {REFIT}")
    if size > MAX_FILE_BYTES:
        raise ModelError(f"{path} is {size:,} bytes, more than a model can be ({MAX_FILE_BYTES:,}); {REFIT}")
    try:
        with zipfile.ZipFile(path) as archive:
            arrays = _read_arrays(archive, path)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise ModelError(f"{path} is not a readable tracepipe model ({exc}); {REFIT}") from exc
    _check(arrays, path)
    return Forest._from_local(arrays)


def _read_arrays(archive: zipfile.ZipFile, path: Path) -> dict[str, np.ndarray]:
    names = {info.filename: info for info in archive.infolist()}
    expected = {f"{name}.npy" for name in ARRAYS}
    if set(names) != expected:
        extra = sorted(set(names) - expected)[:3]
        missing = sorted(expected - set(names))[:3]
        raise ModelError(
            f"{path} does not hold a tracepipe forest (unexpected {extra}, missing {missing}); {REFIT}"
        )
    arrays: dict[str, np.ndarray] = {}
    for name, (dtype, ndim) in ARRAYS.items():
        info = names[f"{name}.npy"]
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version not in ((1, 0), (2, 0)):
                raise ModelError(f"{path}: array {name} has npy format {version}; {REFIT}")
            header = (
                np.lib.format.read_array_header_1_0(member, max_header_size=1024)
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0(member, max_header_size=1024)
            )
            shape, fortran, found = header
            # checked before a byte of data is read: a planted header asking for 10^12 elements is refused here
            if found != dtype or len(shape) != ndim or fortran:
                raise ModelError(
                    f"{path}: array {name} is {found} with {len(shape)} dimensions, expected {dtype} with "
                    f"{ndim}; {REFIT}"
                )
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if count > MAX_NODES + 1:
                raise ModelError(f"{path}: array {name} has {count:,} elements, more than allowed; {REFIT}")
            data = member.read(count * dtype.itemsize + 1)
            if len(data) != count * dtype.itemsize:
                raise ModelError(f"{path}: array {name} is truncated or too long; {REFIT}")
            arrays[name] = np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    return arrays


def _check(arrays: dict[str, np.ndarray], path: Path) -> None:
    """The arrays describe a forest sklearn could have fitted; ModelError naming the first thing that does not."""

    def refuse(what: str) -> None:
        raise ModelError(f"{path}: {what}; the file was altered or is damaged, {REFIT}")

    if int(arrays["format_version"]) != FORMAT_VERSION:
        refuse(f"format version {int(arrays['format_version'])}, this tracepipe reads {FORMAT_VERSION}")
    n_features, max_samples = int(arrays["n_features"]), int(arrays["max_samples"])
    if not 1 <= n_features <= MAX_FEATURES or not 1 <= max_samples <= MAX_NODES:
        refuse(f"n_features {n_features} / max_samples {max_samples} out of range")
    if not np.isfinite(arrays["offset"]):
        refuse("offset is not a finite number")
    offsets = arrays["node_offsets"]
    nodes = len(arrays["feature"])
    if not 2 <= len(offsets) <= MAX_TREES + 1 or offsets[0] != 0 or offsets[-1] != nodes:
        refuse("node_offsets do not cover the nodes")
    sizes = np.diff(offsets)
    if (sizes < 1).any():
        refuse("a tree without nodes")
    for name in ("children_left", "children_right", "threshold", "missing_go_to_left", "n_node_samples"):
        if len(arrays[name]) != nodes:
            refuse(f"{name} has {len(arrays[name])} entries for {nodes} nodes")
    left, right, feature = arrays["children_left"], arrays["children_right"], arrays["feature"]
    leaf = left == -1
    if ((right == -1) != leaf).any():
        refuse("a node with one child")
    size_of_tree = np.repeat(sizes, sizes)
    position = np.arange(nodes) - np.repeat(offsets[:-1], sizes)
    internal = ~leaf
    for child in (left, right):
        if (internal & ((child <= position) | (child >= size_of_tree))).any():
            refuse("a child that is not after its parent in its own tree")
    # every node but the roots is the child of exactly one node: the nodes form trees, no cycles or sharing
    base = np.repeat(offsets[:-1], sizes)
    children = np.concatenate([(left + base)[internal], (right + base)[internal]])
    if len(children) != nodes - len(sizes) or len(np.unique(children)) != len(children):
        refuse("nodes that are not one tree each")
    if (internal & ((feature < 0) | (feature >= n_features))).any():
        refuse(f"a split on a feature outside 0..{n_features - 1}")
    if not np.isfinite(arrays["threshold"][internal]).all():
        refuse("a split threshold that is not a finite number")
    samples = arrays["n_node_samples"]
    if ((samples < 1) | (samples > max_samples)).any():
        refuse(f"node sample counts outside 1..{max_samples}")
    if (arrays["missing_go_to_left"] > 1).any():
        refuse("missing_go_to_left is not 0/1")
