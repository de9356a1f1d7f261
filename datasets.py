"""Data sets for the MIM experiments.

Synthetic Gaussian mixtures with fixed train / validation / test samples drawn from a
seed, labelled by the component that drew each point:

    toy2d   Sec. 5.1, Fig. 1-2: five isotropic components (std 0.25) in 2-D, one at the
            origin and four on the unit circle at 0, 72, 144 and 216 degrees.
    toy20d  App. F.5, Fig. 15: the same five components lifted to 20-D.
    toy1d   App. F.2, Fig. 12: a three-component mixture in 1-D.

The authors' code draws fresh samples every epoch and early-stops on a test set that is
also redrawn every epoch; here the three splits are fixed and disjoint, and early stopping
uses the validation split only.

Images (Sec. 5.2), 28x28 grey levels flattened to 784 columns (`image_shape` (1, 28, 28)):

    mnist              digits, labelled 0-9.
    fashion_mnist      clothing, labelled by its ten classes.
    omniglot           the 28x28 chardata.mat of Burda et al. (IWAE), labelled by alphabet.
    pca_fashion_mnist  Sec. 5.1: Fashion-MNIST projected onto its first `pca_dim` (20)
                       principal components; continuous x.

Validation is the LAST n_val training images, n_val = min(10,000, n_train // 6) for the
IDX data sets: the official 60,000 give 50,000 / 10,000 as in the authors' code, and a
training file of 8,000 images gives 6,667 / 1,333.
Omniglot's training images are first shuffled by `seed`, as the authors' code does, and
n_val = min(1,345, n_train // 6). The test files are the test split.

Binary image sets are dynamically binarized: `x_train` holds the grey levels in [0, 1]
and the training loop draws a fresh Bernoulli image each time it uses one
(`Dataset.dynamic`); validation and test are binarized once, with a generator seeded from
EVAL_BINARIZATION_SEED and `seed`, so that every load gives the same bits.

A `data_dir` given (--data-dir) is the only place files are taken from: the folder itself
or its subfolder named after the data set (mnist/, fashion_mnist/, omniglot/); a file
missing there is refused, naming the folders that hold it. Without one, files are looked
for in $MIM_DATA_DIR, then ~/.cache/mim, then (for Fashion-MNIST) Debian's
/usr/share/datasets/fashion-mnist (`apt-get install dataset-fashion-mnist`), each folder
and its subfolder of that name; otherwise they are downloaded into $MIM_DATA_DIR/<name>/,
or ~/.cache/mim/<name>/ when that variable is unset, checked against the checksums below
and only then moved into place. IDX files may be gzipped or not; files found are used as
they are. A Dataset records where it was read (`source`), for messages.
"""
import gzip
import hashlib
import http.client
import math
import os
import shutil
import stat
import struct
import sys
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch

SPLIT_SIZES = (10_000, 10_000, 10_000)  # train, validation, test; Sec. 5.1 uses 10,000
                                         # samples per epoch
TOY_STD = 0.25                           # component std of Sec. 5.1

IMAGE_SHAPE = (1, 28, 28)                # (C, H, W) of every image set
MAX_VALIDATION = 10_000                  # authors' load_dynamic_mnist: the last 10,000 of
                                         # the 60,000 training digits
VALIDATION_DIVISOR = 6                   # 60,000 // 6 = 10,000: the same rule, scaled
OMNIGLOT_VALIDATION = 1_345              # load_omniglot(n_validation=1345) of the
                                         # authors' and the VampPrior code
EVAL_BINARIZATION_SEED = 777             # the authors seed numpy with 777 before
                                         # binarizing validation and test once
PCA_DIM = 20                             # Sec. 5.1: 20 components of Fashion-MNIST
IDX_CLASSES = 10                         # MNIST and Fashion-MNIST label 0-9


@dataclass
class Dataset:
    """Three labelled splits; x (N, D) float32 and y (N,) int64 tensors."""
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    binary: bool = False
    anchor: "GaussianMixture | None" = None   # P(x) where it is known in closed form
    dynamic: bool = False      # x_train holds grey levels in [0, 1]; binarize every use
    image_shape: tuple | None = None          # (C, H, W) when rows are flattened images
    source: str | None = None  # the folder or file it was read from; None: drawn from seeds

    @property
    def x_dim(self):
        return self.x_train.shape[1]

    def to(self, device):
        moved = {k: v.to(device) for k, v in vars(self).items() if torch.is_tensor(v)}
        return replace(self, **moved)


@dataclass
class GaussianMixture:
    """An equally weighted mixture of isotropic Gaussians: means (K, D), one std."""
    means: np.ndarray
    std: float

    def sample(self, n, rng):
        labels = rng.integers(len(self.means), size=n)
        x = self.means[labels] + self.std * rng.standard_normal((n, self.means.shape[1]))
        return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(labels)

    def log_prob(self, x):
        """log P(x) in nats for x (N, D), by logsumexp over components."""
        x = torch.as_tensor(x, dtype=torch.float64)
        means = torch.as_tensor(self.means, dtype=torch.float64)
        d = means.shape[1]
        sq = ((x[:, None, :] - means[None]) ** 2).sum(-1) / self.std ** 2    # (N, K)
        log_norm = d * math.log(self.std * math.sqrt(2 * math.pi)) + math.log(len(means))
        return torch.logsumexp(-0.5 * sq, dim=1) - log_norm


def pentagon_means():
    """The origin and four points on the unit circle at 0, 72, 144 and 216 degrees."""
    angles = np.deg2rad([0.0, 72.0, 144.0, 216.0])
    return np.vstack([[0.0, 0.0], np.stack([np.cos(angles), np.sin(angles)], axis=1)])


def toy2d():
    return GaussianMixture(pentagon_means(), TOY_STD)


def toy20d():
    """toy2d's means in the first two coordinates; the other 18 drawn once from N(0, 1).

    The authors' code fills those 18 coordinates with a linspace from -50 to 50, which puts
    the inputs far outside the range of a tanh network; unit-scale means keep the five
    components separable in 20-D at the scale of the 2-D problem.
    """
    lift = np.random.default_rng(20).standard_normal((5, 18))
    return GaussianMixture(np.hstack([pentagon_means(), lift]), TOY_STD)


def toy1d():
    return GaussianMixture(np.array([[-2.0], [0.0], [2.0]]), 0.4)



# ----------------------------------------------------------------------------------------
# Where the image files come from
# ----------------------------------------------------------------------------------------

CACHE_DIR = "~/.cache/mim"
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DOWNLOAD_TIMEOUT_S = 60
IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@dataclass(frozen=True)
class Source:
    """The files of one data set, where to download them and how to check them."""
    files: tuple        # names as downloaded; an IDX file may also be found decompressed
    mirrors: tuple      # base URLs, tried in order
    checksums: dict     # file -> "algorithm:hex digest" of the downloaded bytes
    hint: str           # other ways to get the files, for the error message


# Checksums of the downloaded bytes. None could be computed here (no internet); each is a
# published value, agreeing across independent projects:
# - MNIST .gz: SHA-256 listed for the same files at yann.lecun.com, the ossci S3 mirror
#   and storage.googleapis.com/cvdf-datasets (TensorFlow Datasets' URL checksums,
#   Guild AI's MNIST package, the Haskell `mnist` loader, Connor Olding's `mnists`).
# - Fashion-MNIST .gz: SHA-256 of the official files, listed by britefury's `batchup`
#   and by `mnists`. Debian's package re-compresses them (other .gz bytes, whose MD5s
#   differ from the official ones), but their decompressed IDX bytes are the official
#   ones: their git blob ids equal those of the files torchvision downloaded into the
#   authors' repository (data/assets/datasets/fashion-mnist/raw/).
# - Omniglot chardata.mat: no SHA-256 is published; the git blob id (SHA-1 of
#   "blob <size>\0" + bytes) of datasets/OMNIGLOT/chardata.mat in yburda/iwae, the
#   file the URL serves, is; the authors' repository holds the same blob.
SOURCES = {
    "mnist": Source(
        IDX_FILES,
        ("https://ossci-datasets.s3.amazonaws.com/mnist/",
         "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        {"train-images-idx3-ubyte.gz":
             "sha256:440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
         "train-labels-idx1-ubyte.gz":
             "sha256:3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
         "t10k-images-idx3-ubyte.gz":
             "sha256:8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
         "t10k-labels-idx1-ubyte.gz":
             "sha256:f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"},
        ""),
    "fashion_mnist": Source(
        IDX_FILES,
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {"train-images-idx3-ubyte.gz":
             "sha256:08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
         "train-labels-idx1-ubyte.gz":
             "sha256:b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
         "t10k-images-idx3-ubyte.gz":
             "sha256:78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
         "t10k-labels-idx1-ubyte.gz":
             "sha256:42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf"},
        " (or run `apt-get install dataset-fashion-mnist`)"),
    "omniglot": Source(
        ("chardata.mat",),
        ("https://github.com/yburda/iwae/raw/master/datasets/OMNIGLOT/",),
        {"chardata.mat":
             "git-blob-sha1:016a3536ffe5e1d38e42563a18d7a78bfaf643ec"},
        ""),
}


def search_folders(name):
    """The folders looked in for `name`'s files without a data_dir, in order (see the
    module docstring)."""
    roots = [os.environ.get("MIM_DATA_DIR"), os.path.expanduser(CACHE_DIR)]
    if name == "fashion_mnist":
        roots.append(DEBIAN_FASHION_MNIST_DIR)
    return [folder for root in roots if root
            for folder in (str(root), os.path.join(str(root), name))]


def download_folder(name):
    """$MIM_DATA_DIR/<name> when set (a shared data folder), else ~/.cache/mim/<name>."""
    return os.path.join(os.environ.get("MIM_DATA_DIR") or os.path.expanduser(CACHE_DIR),
                        name)


def locate(folder, file):
    """The path of `file` in `folder`, also accepted without its .gz; None if absent.
    An entry of that name that is not a regular file (a folder, a FIFO, a dangling link)
    is refused, in one line, before any download."""
    for candidate in dict.fromkeys((file, file.removesuffix(".gz"))):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
        if os.path.lexists(path):
            raise OSError(f"{path} is {not_a_file(path)}, not a data file; remove it or "
                          "rename it")
    return None


def not_a_file(path):
    """What `path`, an existing entry that is not a regular file, is instead."""
    if not os.path.exists(path):
        return "a broken symbolic link"
    mode = os.stat(path).st_mode
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def find_files(name, data_dir=None):
    """{file: path} for every file of `name`: from data_dir alone where one is given
    (files_in), else from the first folder holding all of them, else downloaded. Raises
    OSError naming every folder looked in when that fails."""
    if data_dir is not None:
        return files_in(name, str(data_dir))
    source, folders = SOURCES[name], search_folders(name)
    for folder in folders:
        paths = [locate(folder, file) for file in source.files]
        if all(paths):
            return dict(zip(source.files, paths))
    target = download_folder(name)
    created = missing_folders(target)
    try:
        for file in source.files:
            if not os.path.isfile(os.path.join(target, file)):
                fetch(source, file, os.path.join(target, file))
    except OSError as err:
        for folder in created:                    # leave no empty folder behind
            try:
                os.rmdir(folder)
            except OSError:
                break
        urls = ", ".join(source.mirrors[0] + file for file in source.files)
        raise OSError(
            f"{name} files not found in {', '.join(dict.fromkeys(folders))} and the "
            f"download failed ({one_line(err)}); get {urls}{source.hint}, put them in one "
            f"of those folders or pass its path as data_dir (--data-dir)") from None
    return {file: os.path.join(target, file) for file in source.files}


def files_in(name, data_dir):
    """{file: path} of `name`'s files in data_dir or data_dir/<name>, the folder the user
    named and the only place they are taken from. Files missing there are refused in one
    line that names the folders holding them, or where to get them."""
    source, folders = SOURCES[name], [data_dir, os.path.join(data_dir, name)]
    found = [{file: locate(folder, file) for file in source.files} for folder in folders]
    for paths in found:
        if all(paths.values()):
            return paths
    best = max(found, key=lambda paths: sum(path is not None for path in paths.values()))
    missing = [file for file, path in best.items() if path is None]
    holding = [folder for folder in dict.fromkeys(search_folders(name))
               if all(holds(folder, file) for file in missing)]
    where = (f"they are in {' and '.join(holding)}" if holding else "get them from "
             f"{', '.join(source.mirrors[0] + file for file in missing)}{source.hint}")
    raise OSError(f"{', '.join(missing)} not found in {data_dir} (nor in {folders[1]}), the "
                  f"--data-dir given; put them there ({where}), or leave out --data-dir")


def holds(folder, file):
    """Whether folder holds `file` as a regular file (for hints: odd entries count as no)."""
    try:
        return locate(folder, file) is not None
    except OSError:
        return False


def missing_folders(path):
    """The folders a makedirs of `path` would create, deepest first."""
    missing = []
    while path and not os.path.lexists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def one_line(err):
    return " ".join(str(err).split())


def fetch(source, file, path):
    """Download `file` from the first mirror that serves it with the right checksum."""
    failures = []
    for mirror in source.mirrors:
        try:
            return download(mirror + file, path, source.checksums[file])
        except OSError as err:
            failures.append(one_line(err))
    raise OSError("; ".join(failures))


def download(url, path, checksum):
    """Download `url` to `path` via a temporary file in the same folder, moved into place
    only once its `checksum` ("algorithm:hex") matches, so `path` is never half-written."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    print(f"downloading {url} to {path}", file=sys.stderr)
    handle, partial_path = tempfile.mkstemp(dir=folder, prefix=".download-")
    try:
        with os.fdopen(handle, "wb") as out, \
                urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            shutil.copyfileobj(response, out)
        algorithm, expected = checksum.split(":")
        if file_digest(partial_path, algorithm) != expected:
            raise OSError(f"{url}: checksum mismatch (expected {checksum})")
        os.replace(partial_path, path)
    except http.client.HTTPException as err:       # e.g. a connection cut mid-file
        raise OSError(f"{url}: {err!r}") from None
    finally:
        if os.path.exists(partial_path):
            os.remove(partial_path)


def file_digest(path, algorithm):
    """Hex digest of a file: "sha256", or "git-blob-sha1", the id git gives the file."""
    with open(path, "rb") as f:
        content = f.read()
    if algorithm == "sha256":
        return hashlib.sha256(content).hexdigest()
    if algorithm == "git-blob-sha1":
        return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


# ----------------------------------------------------------------------------------------
# Parsers
# ----------------------------------------------------------------------------------------

GZIP_MAGIC = b"\x1f\x8b"
IDX_UINT8 = 0x08           # IDX type code of unsigned bytes, the only one MNIST uses
PIXELS = 28 * 28


def read_idx(path):
    """An IDX file (gzipped or not, told by its first bytes) as a uint8 array."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: corrupt gzip data ({one_line(err)}); delete the "
                             "file and get it again") from None
    return parse_idx(raw, path)


def parse_idx(raw, path):
    """Header: two zero bytes, the type code, the number of dimensions, then one
    big-endian int32 size per dimension; the payload is the bytes in C order."""
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != IDX_UINT8:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic "
                         f"{raw[:4].hex() or 'missing'}); delete it and get it again")
    header = 4 + 4 * raw[3]
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header truncated; delete it and get it again")
    shape = struct.unpack(f">{raw[3]}i", raw[4:header])
    if len(raw) - header != math.prod(shape):
        raise ValueError(f"{path}: IDX payload has {len(raw) - header} bytes but its "
                         f"header says {shape}; the file is truncated or corrupt, get it "
                         "again")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def read_chardata(path):
    """Burda et al.'s chardata.mat as (x_train, y_train, x_test, y_test): images (N, 784)
    float32 in [0, 1], upright in row-major order, and alphabet labels int64."""
    import scipy.io                # here, not above: 0.2 s at every start of the command line
    try:
        mat = scipy.io.loadmat(path)
    except Exception as err:         # scipy raises a variety of types on a broken file
        raise ValueError(f"{path}: not a readable .mat file ({one_line(err)}); delete it "
                         "and get it again") from None
    for key in ("data", "testdata"):
        if key not in mat or mat[key].ndim != 2 or mat[key].shape[0] != PIXELS:
            raise ValueError(f"{path}: needs '{key}' of shape (784, N), the layout of "
                             "Burda et al.'s chardata.mat")
        check_grey_levels(mat[key], f"{path}: '{key}'")
    return (omniglot_images(mat["data"]), omniglot_labels(mat, "", path),
            omniglot_images(mat["testdata"]), omniglot_labels(mat, "test", path))


def check_grey_levels(images, what):
    """Refuse, in one line naming `what`, images that are none, or whose values are not
    finite grey levels in [0, 1] (the range Bernoulli decoders and binarization need)."""
    if images.size == 0:
        raise ValueError(f"{what} holds no images; get the file again")
    if not np.isfinite(images).all():
        raise ValueError(f"{what} holds NaN or infinite values; get the file again")
    low, high = float(images.min()), float(images.max())
    if low < 0 or high > 1:
        raise ValueError(f"{what} holds values from {low:g} to {high:g}, not grey levels in "
                         "[0, 1]; get the file again")


def omniglot_images(columns):
    """Each column holds an image in MATLAB's column-major order; the IWAE, VampPrior and
    authors' loaders undo it with a Fortran-order reshape, as the transpose here does."""
    images = columns.T.reshape(-1, 28, 28).transpose(0, 2, 1)
    return np.ascontiguousarray(images.reshape(-1, PIXELS), dtype=np.float32)


def omniglot_labels(mat, prefix, path):
    """The alphabet (0-49) from the one-hot `target`, the class the evaluation's
    classifier should tell apart; without it the 1-based character index `targetchar`
    (the label the authors' loader keeps, but misaligned after its shuffle)."""
    n = mat[prefix + "data"].shape[1]
    if prefix + "target" in mat and mat[prefix + "target"].shape[1:] == (n,):
        return mat[prefix + "target"].argmax(axis=0).astype(np.int64)
    if prefix + "targetchar" in mat and mat[prefix + "targetchar"].size == n:
        labels = mat[prefix + "targetchar"].reshape(n).astype(np.int64) - 1
        if labels.min(initial=0) < 0:
            raise ValueError(f"{path}: '{prefix}targetchar' holds {labels.min() + 1}; "
                             "character indices start at 1; get the file again")
        return labels
    raise ValueError(f"{path}: no labels for '{prefix}data' (expected '{prefix}target' "
                     f"or '{prefix}targetchar' with {n} entries)")


# ----------------------------------------------------------------------------------------
# Image data sets
# ----------------------------------------------------------------------------------------

def validation_size(n_train, cap=MAX_VALIDATION):
    return min(cap, n_train // VALIDATION_DIVISOR)


def idx_split(paths, prefix):
    """Grey levels (N, 784) float32 in [0, 1] and labels (N,) int64 of one IDX split."""
    image_path, label_path = (paths[f"{prefix}-{kind}-idx{d}-ubyte.gz"]
                              for kind, d in (("images", 3), ("labels", 1)))
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise ValueError(f"{image_path} and its labels hold shapes {images.shape} and "
                         f"{labels.shape}, not (N, 28, 28) and (N,); get both files again")
    if len(images) == 0:
        raise ValueError(f"{image_path} holds no images; get the file again")
    if labels.max() >= IDX_CLASSES:
        raise ValueError(f"{label_path} holds label {labels.max()}; its classes are 0-"
                         f"{IDX_CLASSES - 1}; get the file again")
    return images.reshape(len(images), PIXELS) / np.float32(255), labels.astype(np.int64)


def grey_splits(name, data_dir=None):
    """((x, y) train, validation, test) of an IDX data set, x grey levels in [0, 1], and
    the folder of its files."""
    paths = find_files(name, data_dir)
    (x, y), test = idx_split(paths, "train"), idx_split(paths, "t10k")
    cut = len(x) - validation_size(len(x))
    folder = os.path.dirname(paths[IDX_FILES[0]])
    return ((x[:cut], y[:cut]), (x[cut:], y[cut:]), test), folder


def binarized_dataset(name, seed, train, validation, test, source):
    """Grey-level training images for dynamic binarization; validation and test
    binarized once by a generator fixed by `seed`, so every load gives the same bits."""
    rng = np.random.default_rng([EVAL_BINARIZATION_SEED, seed])
    (x_val, y_val), (x_test, y_test) = validation, test
    x_val, x_test = [(rng.random(x.shape) < x).astype(np.float32) for x in (x_val, x_test)]
    tensors = [torch.as_tensor(a) for a in (*train, x_val, y_val, x_test, y_test)]
    return Dataset(name, *tensors, binary=True, dynamic=True, image_shape=IMAGE_SHAPE,
                   source=source)


def load_binarized_idx(name, seed=0, data_dir=None):
    """mnist or fashion_mnist, dynamically binarized."""
    splits, folder = grey_splits(name, data_dir)
    return binarized_dataset(name, seed, *splits, source=folder)


def load_omniglot(seed=0, data_dir=None):
    """Omniglot, dynamically binarized; the training file is shuffled by `seed` before
    the validation cut, as in the authors' code, whose order of the file is unknown to
    us (possibly grouped by alphabet; unseeded in their code)."""
    path = find_files("omniglot", data_dir)["chardata.mat"]
    x, y, x_test, y_test = read_chardata(path)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    cut = len(x) - validation_size(len(x), OMNIGLOT_VALIDATION)
    return binarized_dataset("omniglot", seed, (x[:cut], y[:cut]), (x[cut:], y[cut:]),
                             (x_test, y_test), source=path)


@dataclass
class PrincipalComponents:
    mean: np.ndarray                  # (D,)
    components: np.ndarray            # (k, D), orthonormal rows, by decreasing variance
    explained_variance_ratio: float   # fraction of the total variance the k capture

    def project(self, x):
        """Coordinates (N, k): centred, not scaled (as sklearn's PCA without whitening,
        which the authors use)."""
        return (x - self.mean) @ self.components.T


def principal_components(x, k):
    """The top-k principal components of the rows of x, each signed so that its largest
    entry is positive (principal directions have no sign of their own)."""
    centred = np.array(x, dtype=np.float64)       # a copy: the caller's x is untouched
    mean = centred.mean(axis=0)
    centred -= mean
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred)    # ascending
    if not eigenvalues.sum() > 0:
        raise ValueError("the training images are all alike (no variance), so they have no "
                         "principal components; use the real training file")
    top = eigenvectors[:, ::-1][:, :k].T
    top *= np.sign(top[np.arange(k), np.abs(top).argmax(axis=1)])[:, None]
    ratio = eigenvalues[::-1][:k].sum() / eigenvalues.sum()
    return PrincipalComponents(mean, top, float(ratio))


def load_pca_fashion_mnist(data_dir=None, pca_dim=PCA_DIM):
    """Fashion-MNIST grey levels projected on the first `pca_dim` principal components of
    the training split (after the validation cut), the same basis for all three splits.
    The authors' code fits one basis on the 60,000 training and another on the test
    images, and randomly deforms the training images; neither is done here. Nothing
    here is random, so no seed."""
    if not 1 <= pca_dim <= PIXELS:
        raise ValueError(f"pca_dim must be between 1 and {PIXELS}, not {pca_dim}")
    splits, folder = grey_splits("fashion_mnist", data_dir)
    pca = principal_components(splits[0][0], pca_dim)
    tensors = [torch.as_tensor(a) for x, y in splits
               for a in (pca.project(x).astype(np.float32), y)]
    return Dataset("pca_fashion_mnist", *tensors, source=folder)


DATASETS = {"toy2d": toy2d, "toy20d": toy20d, "toy1d": toy1d}      # name -> anchor
IMAGE_DATASETS = {"mnist": partial(load_binarized_idx, "mnist"),
                  "fashion_mnist": partial(load_binarized_idx, "fashion_mnist"),
                  "omniglot": load_omniglot}
DATASET_NAMES = (*DATASETS, *IMAGE_DATASETS, "pca_fashion_mnist")


def load_dataset(name, seed=0, sizes=SPLIT_SIZES, data_dir=None, pca_dim=PCA_DIM):
    """The data set `name` with train / validation / test splits.

    Synthetic sets draw splits of `sizes` from `seed`; image sets take their splits from
    their files (`sizes` does not apply) and read them from `data_dir` or the folders of
    the module docstring; `pca_dim` is the dimension of pca_fashion_mnist.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown data set {name!r}; choose from "
                         f"{', '.join(DATASET_NAMES)}")
    if name == "pca_fashion_mnist":
        return load_pca_fashion_mnist(data_dir, pca_dim)
    if name in IMAGE_DATASETS:
        return IMAGE_DATASETS[name](seed=seed, data_dir=data_dir)
    anchor = DATASETS[name]()
    rng = np.random.default_rng(seed)
    splits = [anchor.sample(n, rng) for n in sizes]
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = splits
    return Dataset(name, x_train, y_train, x_val, y_val, x_test, y_test, anchor=anchor)


# ----------------------------------------------------------------------------------------
# A data set's fingerprint: what a checkpoint records of its data, so that evaluating or
# resuming elsewhere can check it has the same
# ----------------------------------------------------------------------------------------

def data_shape(data):
    """What a model needs to know of its data (x_dim, binary, image_shape)."""
    return {"x_dim": data.x_dim, "binary": data.binary,
            "image_shape": list(data.image_shape) if data.image_shape else None}


def data_identity(data):
    """The name, the split sizes and a SHA-256 of the test split."""
    digest = hashlib.sha256()
    for t in (data.x_test, data.y_test):
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return {"name": data.name, "sizes": [len(data.x_train), len(data.x_val), len(data.x_test)],
            "test_sha256": digest.hexdigest()}


def data_mismatch(saved, now, path):
    """None where the identity `now` (data_identity) is the one `path` recorded, `saved`;
    else one line saying what differs and what to do. Records from before these
    identities (no test_sha256) are not checked."""
    if "test_sha256" not in saved:
        return None
    if now["test_sha256"] != saved["test_sha256"] or now["name"] != saved["name"]:
        return (f"the {now['name']} test split found here (sizes {now['sizes']}) is not the "
                f"{saved['name']} one {path} was trained with (sizes {saved['sizes']}); pass "
                "--data-dir with the run's data files")
    return None
