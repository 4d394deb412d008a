"""The exceptions a user's input can cause; the CLI prints them as one line instead of a traceback."""
from hybrid_distill.config.load import ConfigError
from hybrid_distill.data.packed import DataError
from hybrid_distill.distill.teacher_cache import TeacherCacheError
from hybrid_distill.models.checkpoint import CheckpointError
from hybrid_distill.models.teacher import TeacherError
from hybrid_distill.select.jobs import ScoreFileError

USER_ERRORS = (ConfigError, DataError, TeacherCacheError, CheckpointError, TeacherError, ScoreFileError, ValueError,
               FileNotFoundError)
