"""Fit editing directions: GANSpace (PCA of sampled W codes) and InterFaceGAN (a linear SVM on labelled latents).

    pca = fit_ganspace(generator, n_samples=100_000, seed=0)  # min(80, style_dim) components
    save_ganspace(pca, "pretrained/editing/pca.pt")                  # e4e's {mean, comp, std} file

    X, y = load_labelled_latents("s3://b/latents", "labels.csv", "smile")   # join on `key`
    direction, stats = fit_interfacegan(X, y)                        # (D,) unit norm, stats["val_accuracy"]
    save_interfacegan(torch.from_numpy(direction), "smile.pt")      # e4e's (1, D) file

Both files load with :func:`clcae.editing.load_ganspace` / :func:`~clcae.editing.load_interfacegan` and plug into
a :class:`~clcae.editing.DirectionRegistry`. ``jobs/directions.py`` is the command line.

GANSpace (Härkönen et al. 2020): w = mapping(z), z ~ N(0, I) from a seeded torch generator; components are the
unit principal axes of those absolute W codes (``latent_avg`` is not subtracted, as in e4e's files), ``std`` the
square root of their explained variance (sample variance, ddof 1), ``mean`` the sample mean. Beyond one batch,
scikit-learn's IncrementalPCA streams the samples, so memory is bounded by the batch, not ``n_samples``.

InterFaceGAN (Shen et al. 2020): a linear SVM separates the two classes in the raw latent space; the direction
is the hyperplane's unit normal, oriented towards the positive class. Continuous labels keep only the top and
bottom ``ratio`` of the samples (positive / negative), as the paper's ``train_boundary`` does (0.02 there);
two-valued labels (0/1, bool, -1/1) use every sample, the larger value being positive. The paper uses libsvm
(``SVC(kernel="linear")``), whose cost grows quadratically with the samples; we use liblinear's ``LinearSVC``
(the same linear model with a squared hinge, linear in the samples). liblinear penalises the intercept, so the
latents are centred first: a translation leaves the normal unchanged and makes the intercept small.
No per-dimension standardisation: it would tilt the normal in the original space.

Latent tables (DESIGN.md, "Latent tables") are Parquet with ``key`` and ``w`` (``fixed_size_list<float32>[D]``)
and optionally ``w_plus`` (``fixed_size_list<float32>[N*D]`` with ``w_plus_shape`` metadata, or nested lists);
a folder holding ``latents/`` (what the batch job writes) is read from there, its ``errors/`` ignored.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import torch

from clcae.checkpoints import CHECKPOINT_FORMAT
from clcae.config import CLCAEConfig, StorageConfig
from clcae.data import storage as st
from clcae.editing import GANSpacePCA, load_ganspace, load_interfacegan, save_ganspace, save_interfacegan
from clcae.errors import CLCAEError
from clcae.factory import build_generator
from clcae.weights import WeightsError, load_generator, load_into, read_state

log = logging.getLogger(__name__)

SPACES = ("w", "w_plus")
# GANSpace components kept by default: e4e's ffhq_pca.pt has 80 of a 512-wide W; a narrower W keeps all it has.
DEFAULT_COMPONENTS = 80
LABEL_KINDS = ("auto", "binary", "continuous")


class DirectionFitError(CLCAEError, ValueError):
    """Inputs from which no direction can be fitted; the message names what is wrong and how to fix it."""


# ---------------------------------------------------------------------------------------------------
# GANSpace


@torch.no_grad()
def sample_w(generator: torch.nn.Module, n_samples: int, seed: int = 0, batch: int = 10_000) -> Iterator[np.ndarray]:
    """w = mapping(z) for ``n_samples`` z ~ N(0, I), in float64 batches of at most ``batch`` rows.

    z comes from a CPU ``torch.Generator`` seeded with ``seed`` in chunks of ``batch`` (the draws of
    ``Generator.mean_latent(n, seed, chunk=batch)``), so the same (seed, batch) gives the same codes on any device.
    """
    gen = torch.Generator().manual_seed(seed)
    device = next(generator.parameters()).device
    done = 0
    while done < n_samples:
        n = min(batch, n_samples - done)
        z = torch.randn(n, generator.style_dim, generator=gen)
        yield generator.mapping(z.to(device)).double().cpu().numpy()
        done += n


def fit_ganspace_report(generator: torch.nn.Module, n_samples: int = 100_000, components: int | None = None,
                        seed: int = 0, batch: int = 10_000) -> tuple[GANSpacePCA, dict[str, Any]]:
    """:func:`fit_ganspace` plus a JSON-ready summary (samples, explained variance ratio, method).
    ``components=None`` keeps min(DEFAULT_COMPONENTS, style_dim)."""
    from sklearn.decomposition import PCA, IncrementalPCA

    d = int(generator.style_dim)
    if components is None:
        components = min(DEFAULT_COMPONENTS, d)
    if components > d:
        raise DirectionFitError(f"asked for {components} components, but the generator's W has {d} dimensions "
                                f"(generator.style_dim): at most {d} principal components exist; ask for fewer, or "
                                f"leave the number out for min({DEFAULT_COMPONENTS}, style_dim)")
    if components < 1:
        raise DirectionFitError(f"components = {components}: must be at least 1")
    if n_samples < components + 1:
        raise DirectionFitError(f"n_samples = {n_samples}: need more samples than components ({components})")
    if batch < components:
        raise DirectionFitError(f"batch = {batch}: IncrementalPCA needs batches of at least `components` "
                                f"({components}) samples; raise the batch")
    if n_samples <= batch:
        method = "sklearn PCA (full SVD), one batch"
        pca = PCA(n_components=components, svd_solver="full").fit(np.concatenate(list(
            sample_w(generator, n_samples, seed, batch))))
    else:
        method = f"sklearn IncrementalPCA, batches of {batch}"
        pca = IncrementalPCA(n_components=components)
        pending = None  # IncrementalPCA refuses a batch smaller than n_components: fold a short tail in
        for w in sample_w(generator, n_samples, seed, batch):
            if pending is not None:
                if len(w) < components:
                    w = np.concatenate([pending, w])
                else:
                    pca.partial_fit(pending)
            pending = w
        pca.partial_fit(pending)
    variance = np.asarray(pca.explained_variance_, np.float64)
    result = GANSpacePCA(
        mean=torch.from_numpy(pca.mean_).float(),
        comp=torch.from_numpy(pca.components_).float(),
        std=torch.from_numpy(np.sqrt(np.maximum(variance, 0.0))).float(),
        source=f"fit_ganspace(n_samples={n_samples}, seed={seed})",
    )
    if not (result.std > 0).all():
        raise DirectionFitError(f"{int((result.std <= 0).sum())} of {components} components have zero variance: "
                                "the generator's W has fewer dimensions than that; ask for fewer components")
    report = {
        "method": method,
        "n_samples": n_samples,
        "components": components,
        "style_dim": d,
        "seed": seed,
        "explained_variance_ratio_kept": float(np.sum(pca.explained_variance_ratio_)),
        "std_first": [round(float(s), 6) for s in result.std[:10]],
    }
    return result, report


def fit_ganspace(generator: torch.nn.Module, n_samples: int = 100_000, components: int | None = None, seed: int = 0,
                 batch: int = 10_000) -> GANSpacePCA:
    """PCA of ``mapping(z)`` over ``n_samples`` seeded z ~ N(0, I): unit components ``comp`` (K, D) sorted by
    decreasing ``std`` (K,) = sqrt(explained variance), ``mean`` (D,). Write it with ``save_ganspace``."""
    return fit_ganspace_report(generator, n_samples, components, seed, batch)[0]


# ---------------------------------------------------------------------------------------------------
# InterFaceGAN


def fit_interfacegan(latents: np.ndarray, labels: np.ndarray, *, ratio: float = 0.02, label_kind: str = "auto",
                     val_fraction: float = 0.3, C: float = 1.0, seed: int = 0, min_per_class: int = 10,
                     max_iter: int = 10_000) -> tuple[np.ndarray, dict[str, Any]]:
    """Unit normal (D,) float32 of a linear SVM separating the labelled latents (N, D), and fit statistics.

    Labels with two distinct values are classes (the larger value positive); more values are a continuous
    score of which the top / bottom ``ratio`` are the positive / negative samples (``label_kind`` forces either
    reading). ``val_fraction`` of each class is held out (stratified, seeded) for ``stats["val_accuracy"]``.
    The direction points to the positive side: ``w + s * d`` with s > 0 moves towards the positive class.
    """
    x, y_raw = _check_xy(latents, labels)
    if label_kind not in LABEL_KINDS:
        raise DirectionFitError(f"label_kind must be one of {LABEL_KINDS}, got {label_kind!r}")
    if not 0 <= val_fraction < 1:
        raise DirectionFitError(f"val_fraction = {val_fraction}: must be in [0, 1)")
    values = np.unique(y_raw)
    if len(values) < 2:
        raise DirectionFitError(f"all {len(y_raw)} labels have the same value ({values[0]!r}): one class only; "
                                "InterFaceGAN needs positive and negative examples")
    kind = label_kind if label_kind != "auto" else ("binary" if len(values) == 2 else "continuous")
    stats: dict[str, Any] = {"label_kind": kind, "n_rows": len(y_raw)}
    if kind == "binary":
        if len(values) != 2:
            raise DirectionFitError(f"label_kind='binary' needs exactly two label values, found {len(values)} "
                                    f"(e.g. {values[:5].tolist()}); use label_kind='continuous'")
        idx = np.arange(len(y_raw))
        y = y_raw == values[1]
        stats.update(negative_value=values[0].item(), positive_value=values[1].item())
    else:
        idx, y, cut = _extremes(y_raw, ratio, min_per_class)
        stats.update(ratio=ratio, **cut)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    stats.update(n_positive=n_pos, n_negative=n_neg)
    if min(n_pos, n_neg) < min_per_class:
        which = "positive" if n_pos < n_neg else "negative"
        raise DirectionFitError(f"too few samples: the {which} class has {min(n_pos, n_neg)} (positive {n_pos}, "
                                f"negative {n_neg}); need at least {min_per_class} per class")

    train, val = _split(y, val_fraction, seed)
    x_train, y_train = x[idx[train]], y[train]
    center = x_train.mean(axis=0)
    clf, converged = _linear_svm(x_train - center, y_train, C, seed, max_iter)
    normal = clf.coef_.reshape(-1).astype(np.float64)
    norm = float(np.linalg.norm(normal))
    if not math.isfinite(norm) or norm == 0:
        raise DirectionFitError("the SVM found no separating direction (zero normal); check the labels")
    direction = normal / norm
    # coef_ points to clf.classes_[1] (True); the check makes the orientation explicit rather than assumed.
    if (x_train[y_train] @ direction).mean() < (x_train[~y_train] @ direction).mean():
        direction = -direction
    stats.update(
        n_train=int(len(train)), n_val=int(len(val)),
        train_accuracy=float(clf.score(x_train - center, y_train)),
        val_accuracy=float(clf.score(x[idx[val]] - center, y[val])) if len(val) else None,
        converged=converged,
        solver=f"sklearn LinearSVC (liblinear, squared hinge, C={C}) on mean-centred raw latents",
        seed=seed,
    )
    return direction.astype(np.float32), stats


def _check_xy(latents: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(latents)
    y = np.asarray(labels)
    if x.ndim != 2:
        raise DirectionFitError(f"latents must be (N, D), got shape {x.shape}; flatten w+ to (N, L*D) first")
    if y.ndim != 1 or len(y) != len(x):
        raise DirectionFitError(f"labels must be (N,) with N = {len(x)} (one per latent), got shape {y.shape}")
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
        raise DirectionFitError(f"labels have dtype {y.dtype}; use numbers (0/1 or a score) or booleans")
    x = x.astype(np.float64, copy=False)
    bad_x = ~np.isfinite(x).all(axis=1)
    if bad_x.any():
        raise DirectionFitError(f"{int(bad_x.sum())} of {len(x)} latents contain NaN or infinite values "
                                f"(first at row {int(np.argmax(bad_x))})")
    if y.dtype != bool:
        bad_y = ~np.isfinite(y.astype(np.float64))
        if bad_y.any():
            raise DirectionFitError(f"{int(bad_y.sum())} of {len(y)} labels are NaN or infinite (first at row "
                                    f"{int(np.argmax(bad_y))}); drop those rows or fill them")
    return x, y


def _extremes(scores: np.ndarray, ratio: float, min_per_class: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Indices of the bottom and top ``ratio`` of ``scores`` and their labels (True = top), as InterFaceGAN."""
    if not 0 < ratio <= 0.5:
        raise DirectionFitError(f"ratio = {ratio}: must be in (0, 0.5] (the fraction taken from each end)")
    n = len(scores)
    k = int(ratio * n)
    if k < min_per_class:
        raise DirectionFitError(
            f"too few samples: ratio {ratio} of {n} continuous labels keeps {k} per side, need at least "
            f"{min_per_class}; raise the ratio (to >= {min_per_class / max(n, 1):.3g}) or label more latents")
    order = np.argsort(scores, kind="stable")
    low, high = order[:k], order[-k:]
    if scores[high].min() <= scores[low].max():
        raise DirectionFitError(f"the top and bottom {ratio:.3g} of the labels overlap (tied values "
                                f"{scores[low].max()!r}); lower the ratio or use label_kind='binary'")
    idx = np.concatenate([low, high])
    y = np.concatenate([np.zeros(k, bool), np.ones(k, bool)])
    return idx, y, {"negative_max": scores[low].max().item(), "positive_min": scores[high].min().item()}


def _split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    positions = np.arange(len(y))
    if val_fraction == 0:
        return positions, positions[:0]
    train, val = train_test_split(positions, test_size=val_fraction, stratify=y, random_state=seed)
    return np.sort(train), np.sort(val)


def _linear_svm(x: np.ndarray, y: np.ndarray, C: float, seed: int, max_iter: int) -> tuple[Any, bool]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    clf = LinearSVC(C=C, dual="auto", max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    if not converged:
        log.warning("LinearSVC did not converge in %d iterations; the direction may be rough (raise max_iter)",
                    max_iter)
    return clf, converged


# ---------------------------------------------------------------------------------------------------
# Latent tables


def load_labelled_latents(latent_uri: str, label_uri: str | None, label_column: str,
                          storage: StorageConfig | None = None, space: str = "w") -> tuple[np.ndarray, np.ndarray]:
    """(X, y) from a latent table joined with labels on ``key``.

    X is (M, D) float32 for ``space="w"``, (M, L, D) for ``"w_plus"``; y (M,) holds ``label_column``, taken from
    ``label_uri`` (Parquet file/folder or CSV with ``key`` and the column) or, with ``label_uri=None``, from the
    latent table itself. Rows are in latent-table order; M counts the keys found in both tables (logged).
    """
    x, y, _ = read_labelled_latents(latent_uri, label_uri, label_column, storage, space)
    return x, y


def read_labelled_latents(latent_uri: str, label_uri: str | None, label_column: str,
                          storage: StorageConfig | None = None, space: str = "w"
                          ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """:func:`load_labelled_latents` plus join counts: ``{"latent_rows", "label_rows", "matched"}``."""
    if space not in SPACES:
        raise DirectionFitError(f"space must be one of {SPACES}, got {space!r}")
    latent_files = _latent_files(latent_uri, storage)
    own_label = label_uri is None
    columns = ["key", space] + ([label_column] if own_label else [])
    schema = _check_columns(latent_files[0], storage, columns, "latent table",
                            "" if not own_label else " (or give a label table with --labels)")
    latents = _read_parquet(latent_files, storage, columns, "latent table")
    _check_unique(latents.column("key"), f"latent table {latent_uri}")
    x = _latent_array(latents.column(space), space, schema, latent_uri)
    if own_label:
        y = _label_array(latents.column(label_column), label_column, latent_uri)
        info = {"latent_rows": len(x), "label_rows": len(y), "matched": len(y)}
        return x, y, info

    labels = _read_labels(label_uri, label_column, storage)
    _check_unique(labels.column("key"), f"label table {label_uri}")
    left = pa.table({"key": _as_string(latents.column("key")), "__row": pa.array(np.arange(len(x)))})
    right = pa.table({"key": _as_string(labels.column("key")), "__label": labels.column(label_column)})
    joined = left.join(right, "key", join_type="inner").sort_by("__row")
    matched = joined.num_rows
    info = {"latent_rows": len(x), "label_rows": labels.num_rows, "matched": matched}
    if matched == 0:
        raise DirectionFitError(
            f"no keys match between the latent table {latent_uri} ({len(x)} rows, e.g. "
            f"{latents.column('key').slice(0, 3).to_pylist()}) and the label table {label_uri} "
            f"({labels.num_rows} rows, e.g. {labels.column('key').slice(0, 3).to_pylist()}): 0 keys matched")
    if matched < len(x) or matched < labels.num_rows:
        log.warning("%d keys matched: %d of %d latent rows have no label, %d of %d labels have no latent",
                    matched, len(x) - matched, len(x), labels.num_rows - matched, labels.num_rows)
    rows = joined.column("__row").to_numpy()
    y = _label_array(joined.column("__label"), label_column, label_uri)
    return x[rows], y, info


def _latent_files(uri: str, storage: StorageConfig | None) -> list[str]:
    # The batch job writes OUT/latents and OUT/errors: read the former, never the error rows.
    files = st.list_files(uri, storage)
    prefix = st.join(uri, "latents") + "/"
    files = [f for f in files if f.startswith(prefix)] or files
    if not files:
        why = "no .parquet files there" if st.exists(uri, storage) else "no such file or folder"
        raise DirectionFitError(f"latent table {uri}: {why}")
    return files


def _read_labels(uri: str, column: str, storage: StorageConfig | None) -> pa.Table:
    if uri.lower().endswith(".csv"):
        fs, path = st.filesystem(uri, storage)
        with st.storage_errors(uri, storage), fs.open(path, "rb") as fh:
            try:
                # keys such as "00012" must stay strings, not become the number 12
                table = pa_csv.read_csv(fh, convert_options=pa_csv.ConvertOptions(column_types={"key": pa.string()}))
            except pa.ArrowInvalid as exc:
                raise DirectionFitError(f"label table {uri}: not a readable CSV ({exc})") from None
        missing = [c for c in ("key", column) if c not in table.column_names]
        if missing:
            raise DirectionFitError(f"label table {uri}: no column(s) {missing}; it has {table.column_names}")
        return table.select(["key", column])
    files = st.list_files(uri, storage)
    if not files:
        why = "no .parquet files there" if st.exists(uri, storage) else "no such file or folder"
        raise DirectionFitError(f"label table {uri}: {why} (give a .csv or Parquet file / folder)")
    _check_columns(files[0], storage, ["key", column], "label table", "")
    return _read_parquet(files, storage, ["key", column], "label table")


def _schema(uri: str, storage: StorageConfig | None) -> pa.Schema:
    fs, path = st.filesystem(uri, storage)
    with st.storage_errors(uri, storage), fs.open(path, "rb") as fh:
        try:
            return pq.ParquetFile(fh).schema_arrow
        except (pa.ArrowInvalid, OSError) as exc:
            raise DirectionFitError(f"{uri}: not a readable Parquet file ({exc})") from None


def _check_columns(uri: str, storage: StorageConfig | None, columns: list[str], what: str, hint: str) -> pa.Schema:
    schema = _schema(uri, storage)
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise DirectionFitError(f"{what} {uri}: no column(s) {missing}; it has {schema.names}{hint}")
    return schema


def _read_parquet(files: list[str], storage: StorageConfig | None, columns: list[str], what: str) -> pa.Table:
    tables = []
    for uri in files:
        fs, path = st.filesystem(uri, storage)
        with st.storage_errors(uri, storage), fs.open(path, "rb") as fh:
            parquet = pq.ParquetFile(fh)
            missing = [c for c in columns if c not in parquet.schema_arrow.names]
            if missing:
                raise DirectionFitError(f"{what} {uri}: no column(s) {missing}; it has {parquet.schema_arrow.names}")
            tables.append(parquet.read(columns=columns))
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DirectionFitError(f"{what}: the files disagree on column types ({exc})") from None


def _check_unique(keys: pa.ChunkedArray, what: str) -> None:
    if keys.null_count:
        raise DirectionFitError(f"{what}: {keys.null_count} rows have no key")
    if pc.count_distinct(keys).as_py() != len(keys):
        counts = pc.value_counts(keys)
        dup = [v["values"] for v in counts.to_pylist() if v["counts"] > 1]
        raise DirectionFitError(f"{what}: {len(dup)} duplicate key(s), e.g. {dup[:3]}; keys must be unique")


def _as_string(keys: pa.ChunkedArray) -> pa.ChunkedArray:
    return keys if pa.types.is_string(keys.type) else pc.cast(keys, pa.string())


def _latent_array(column: pa.ChunkedArray, space: str, schema: pa.Schema, uri: str) -> np.ndarray:
    if column.null_count:
        raise DirectionFitError(f"latent table {uri}: {column.null_count} rows have a null {space!r}")
    shape: list[int] = []
    tp = column.type
    while pa.types.is_fixed_size_list(tp):
        shape.append(tp.list_size)
        tp = tp.value_type
    if not shape or not pa.types.is_floating(tp):
        raise DirectionFitError(f"latent table {uri}: column {space!r} is {column.type}; expected "
                                "fixed_size_list<float32>[D] (pa.list_(pa.float32(), D))")
    values = column.combine_chunks()
    for _ in shape:
        values = values.flatten()
    x = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(column), *shape)
    if space == "w_plus" and x.ndim == 2:
        x = x.reshape(len(column), *_w_plus_shape(schema, x.shape[1], uri))
    return x


def _w_plus_shape(schema: pa.Schema, width: int, uri: str) -> tuple[int, int]:
    meta = schema.metadata or {}
    if b"w_plus_shape" in meta:
        n, d = (int(v) for v in meta[b"w_plus_shape"].decode().split(","))
    elif "w" in schema.names and pa.types.is_fixed_size_list(schema.field("w").type):
        d = schema.field("w").type.list_size
        n = width // d
    else:
        raise DirectionFitError(f"latent table {uri}: 'w_plus' is a flat list of {width} values and neither a "
                                "'w_plus_shape' metadata entry nor a 'w' column gives its (N, D) shape")
    if n * d != width:
        raise DirectionFitError(f"latent table {uri}: 'w_plus' has {width} values per row, not N x D = {n} x {d}")
    return n, d


def _label_array(column: pa.ChunkedArray, name: str, uri: str) -> np.ndarray:
    tp = column.type
    if not (pa.types.is_integer(tp) or pa.types.is_floating(tp) or pa.types.is_boolean(tp)):
        raise DirectionFitError(f"label column {name!r} in {uri} is {tp}; use numbers (0/1 or a score) or booleans")
    if column.null_count:
        raise DirectionFitError(f"label column {name!r} in {uri}: {column.null_count} rows have no value (null); "
                                "drop them or fill them")
    return column.to_numpy()


# ---------------------------------------------------------------------------------------------------
# Whole jobs (what jobs/directions.py runs)


def generator_for(cfg: CLCAEConfig, checkpoint: str | None = None) -> torch.nn.Module:
    """The generator to sample from: ``checkpoint`` may be a rosinality ``.pt`` (``g_ema``) or our stage-2
    checkpoint (its ``decoder.*``); without one, ``generator.checkpoint`` or the config's seeded random init."""
    if checkpoint is None:
        return build_generator(cfg)[0]
    ckpt = read_state(checkpoint)
    if isinstance(ckpt, Mapping) and "g_ema" in ckpt:
        del ckpt  # load_generator reads the file again; free this copy first (a 1024 generator is ~350 MB)
        return load_generator(checkpoint, cfg)[0]
    if isinstance(ckpt, Mapping) and ckpt.get("format") == CHECKPOINT_FORMAT and "state_dict" in ckpt:
        state = {k[len("decoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("decoder.")}
        if not state:
            raise WeightsError(f"{checkpoint} is a {ckpt.get('kind')!r} checkpoint without a generator "
                               "(no decoder.* keys); give a stage-2 (inversion) checkpoint or a StyleGAN2 .pt")
        generator = build_generator(cfg, load=False)[0]
        load_into(generator, state, checkpoint, "StyleGAN2 generator of the config", allow_missing=("noises.",))
        return generator.requires_grad_(False).eval()
    raise WeightsError(f"{checkpoint}: neither a rosinality StyleGAN2 checkpoint (g_ema) nor a clcae-platform "
                       "checkpoint")


def fit_ganspace_to_file(generator: torch.nn.Module, out: str, n_samples: int = 100_000,
                         components: int | None = None, seed: int = 0, batch: int = 10_000) -> dict[str, Any]:
    """Fit, write e4e's PCA file to ``out`` (any URI) and check it loads back; returns the summary."""
    pca, report = fit_ganspace_report(generator, n_samples, components, seed, batch)
    save_ganspace(pca, out)
    load_ganspace(out, style_dim=pca.style_dim)
    return {"kind": "ganspace", "out": out, **report,
            "config_example": {"kind": "ganspace", "path": out, "component": 0,
                               "layers": [0, int(getattr(generator, "n_latent", 1))], "max_strength": 5.0}}


def fit_interfacegan_to_file(latent_uri: str, label_uri: str | None, label_column: str, out: str,
                             storage: StorageConfig | None = None, space: str = "w",
                             **fit_kwargs: Any) -> dict[str, Any]:
    """Read and join the tables, fit, write e4e's direction file to ``out`` and check it loads back.

    ``space="w"`` writes a (1, D) tensor. ``space="w_plus"`` fits on flattened w+ and writes the unit normal as a
    (1, L, D) tensor; note that the platform's InterFaceGAN edit acts on w, so it uses that file's layer 0 only.
    """
    x, y, info = read_labelled_latents(latent_uri, label_uri, label_column, storage, space)
    direction, stats = fit_interfacegan(x.reshape(len(x), -1), y, **fit_kwargs)
    vector = torch.from_numpy(direction)
    if space == "w":
        save_interfacegan(vector, out)
    else:  # save_interfacegan flattens to (1, D); keep the per-layer layout e4e's pose.pt has
        with fsspec.open(out, "wb") as fh:
            torch.save(vector.reshape(1, *x.shape[1:]).clone(), fh)
    load_interfacegan(out, style_dim=x.shape[-1])
    summary = {"kind": "interfacegan", "out": out, "space": space, "label_column": label_column,
               "keys": info, **stats,
               "config_example": {"kind": "interfacegan", "path": out, "max_strength": 3.0}}
    if space == "w_plus":
        summary["note"] = ("fitted in W+ and saved as (1, L, D); the platform's InterFaceGAN edit is applied to w "
                           "before the cross-attention blocks and uses layer 0 only: fit in 'w' for that")
    return summary
