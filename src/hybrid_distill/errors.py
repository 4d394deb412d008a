"""The exceptions a user's input can cause; the CLI prints them as one line instead of a traceback.

Each of the package's input errors (ConfigError, DataError, TeacherCacheError, CheckpointError, TeacherError,
ScoreFileError) is a ValueError, so they are caught here without importing their modules: the local rules'
steps then start without torch.
"""
USER_ERRORS = (ValueError, FileNotFoundError)
