"""The TFDS builder over local text files, so user files and the default corpus are read like any TFDS dataset.

Importing this module imports `tensorflow_datasets` but not TensorFlow: the builder writes ArrayRecord files, which
TFDS writes and reads without TensorFlow. `lm.data.sources` imports it lazily; what a document is (`TextFilesSpec`,
`read_documents`) and which split it belongs to (`is_validation`) are `lm.data.text_files`'s.

The dataset is prepared once into `data_dir/lm_text_files/<fingerprint>/1.0.0/` (ArrayRecord); the fingerprint is
the builder config name, so edited files are prepared again and unchanged ones are reused. Examples are
`{'text': Text, 'key': Text}`, splits `train` and `validation`; TFDS stores them in the order of the hash of their
key, which is deterministic.
"""

from __future__ import annotations

import functools

import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tensorflow_datasets.core.utils import tqdm_utils

from lm.data import text_files
from lm.errors import EmptyDatasetError


class LmTextFiles(tfds.core.GeneratorBasedBuilder):
    """Local text / JSON-lines files as a TFDS dataset (documents and splits: `lm.data.text_files.TextFilesSpec`).

    Built with `LmTextFiles(spec=spec, data_dir=...)`: the builder config, named by `spec.fingerprint()`, is made
    on the fly, so one registered builder serves any set of files.
    """

    VERSION = tfds.core.Version(text_files.TEXT_FILES_VERSION)
    RELEASE_NOTES = {text_files.TEXT_FILES_VERSION: "Text and JSON-lines files; splits by key hash."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS would derive this path through `importlib_resources`, a package TFDS does not declare; this module
        # is the code path (it has no checksums or metadata files beside it, which is what TFDS looks for there).
        return epath.Path(__file__)

    def __init__(self, *, spec: text_files.TextFilesSpec, **kwargs):
        self._spec = spec
        config = tfds.core.BuilderConfig(
            name=spec.fingerprint(), description=f"{len(spec.files)} files under {spec.root}")
        super().__init__(config=config, file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: `dataset_info_from_configs` would look for metadata files beside this module.
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local text files; one document per text file or JSON line.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "key": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the documents are local files.
        # TFDS cannot store a split without examples, so a split no document falls into is left out (and
        # `lm.data.sources.resolve` reports it as empty).
        counts = {False: 0, True: 0}
        for key in text_files.document_keys(self._spec):
            counts[text_files.is_validation(key, self._spec.validation_percent)] += 1
        if not any(counts.values()):
            raise EmptyDatasetError(
                f"{len(self._spec.files)} files under {self._spec.root} hold no documents (all empty JSON lines)")
        names = {False: "train", True: "validation"}
        return {names[v]: self._generate_examples(validation=v) for v in (False, True) if counts[v]}

    def _generate_examples(self, validation: bool):
        for key, text in text_files.read_documents(self._spec):
            if text_files.is_validation(key, self._spec.validation_percent) == validation:
                yield key, {"text": text, "key": key}


@functools.lru_cache(maxsize=32)
def prepare(spec: text_files.TextFilesSpec, data_dir: str) -> LmTextFiles:
    """Returns the builder for `spec`, preparing it under `data_dir` unless an earlier run already did.

    Builders are kept per (spec, data_dir) for the life of the process (TFDS logs a line for each one made).
    """
    builder = LmTextFiles(spec=spec, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    logging.info("preparing %d files under %s as TFDS dataset %s in %s", len(spec.files), spec.root,
                 builder.info.full_name, data_dir)
    # TFDS's per-split progress bars would interleave with the run's logs; the previous setting is restored.
    progress_bars = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except FileExistsError:
        # Another process (the other hosts of a run on a shared disk, a parallel job) finished preparing the same
        # dataset first: TFDS prepares into a temporary directory and cannot rename it over the finished one.
        builder = LmTextFiles(spec=spec, data_dir=data_dir)
        if not builder.is_prepared():
            raise
    finally:
        tfds.display_progress_bar(progress_bars)
    return builder
