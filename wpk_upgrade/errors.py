"""The one error catalogue (codes and texts of the reference system) and the exception tree.

Three numbered families exist on the wire, each with the reference's exact texts:

* ``UpgradeCode``: the manager upgrade module (socket ``queue/tasks/upgrade``), reference §3.1,
  4.14 numbering (decision D4: 25 is the missing-dependency error, 26 "could not start").
* ``TaskCode``: the task manager (socket ``queue/tasks/task``), reference §3.2; plus 8, ours,
  for the ``upgrade_cancel`` extension.
* ``AgentCode``: replies of the agent's command handler, reference §3.3.

Exception tree::

    WpkUpgradeError                 anything this project raises on purpose; one clear line
    +-- ConfigError                 a configuration file is invalid (names file and key path)
    +-- PluginError                 a driver or hook plugin cannot be found or loaded
    +-- ProtocolError               a peer sent something the wire format does not allow
    +-- CodedError                  carries an UpgradeCode/TaskCode/AgentCode and a detail
        +-- UpgradeError            an upgrade-module code (sources, transfer, validation)
        +-- TaskError               a task-manager code
        +-- AgentCommandError       an agent command-handler code
            +-- WpkError            a WPK failed a format, trust or unpack check

Drivers wrap third-party errors at their boundary (``raise UpgradeError(...) from exc``).
"""

from __future__ import annotations

from enum import IntEnum


class UpgradeCode(IntEnum):
    """Manager upgrade-module codes (reference §3.1, v4.14 numbering)."""

    SUCCESS = 0
    PARSING_ERROR = 1
    PARSING_REQUIRED_PARAMETER = 2
    TASK_CONFIGURATIONS = 3
    TASK_MANAGER_COMMUNICATION = 4
    TASK_MANAGER_FAILURE = 5
    GLOBAL_DB_FAILURE = 6
    INVALID_ACTION_FOR_MANAGER = 7
    AGENT_IS_NOT_ACTIVE = 8
    SYSTEM_NOT_SUPPORTED = 9
    UPGRADE_ALREADY_IN_PROGRESS = 10
    NOT_MINIMAL_VERSION_SUPPORTED = 11
    NEW_VERSION_LEES_OR_EQUAL_THAT_CURRENT = 12
    NEW_VERSION_GREATER_MASTER = 13
    URL_NOT_FOUND = 14
    WPK_VERSION_DOES_NOT_EXIST = 15
    WPK_FILE_DOES_NOT_EXIST = 16
    WPK_SHA1_DOES_NOT_MATCH = 17
    SEND_LOCK_RESTART_ERROR = 18
    SEND_OPEN_ERROR = 19
    SEND_WRITE_ERROR = 20
    SEND_CLOSE_ERROR = 21
    SEND_SHA1_ERROR = 22
    SEND_UPGRADE_ERROR = 23
    UPGRADE_ERROR = 24
    UPGRADE_ERROR_MISSING_PACKAGE = 25
    UNKNOWN_ERROR = 26


UPGRADE_MESSAGES: dict[UpgradeCode, str] = {
    UpgradeCode.SUCCESS: "Success",
    UpgradeCode.PARSING_ERROR: "Could not parse message JSON",
    UpgradeCode.PARSING_REQUIRED_PARAMETER: "Required parameters in json message where not found",
    UpgradeCode.TASK_CONFIGURATIONS: "JSON parameter not recognized",
    UpgradeCode.TASK_MANAGER_COMMUNICATION: "Task manager communication error",
    UpgradeCode.TASK_MANAGER_FAILURE: "",
    UpgradeCode.GLOBAL_DB_FAILURE: "Agent information not found in database",
    UpgradeCode.INVALID_ACTION_FOR_MANAGER: "Action not available for Manager (agent 000)",
    UpgradeCode.AGENT_IS_NOT_ACTIVE: "Agent is not active",
    UpgradeCode.SYSTEM_NOT_SUPPORTED: "The WPK for this platform is not available",
    UpgradeCode.UPGRADE_ALREADY_IN_PROGRESS: (
        "Upgrade procedure could not start. Agent already upgrading"
    ),
    UpgradeCode.NOT_MINIMAL_VERSION_SUPPORTED: (
        "Remote upgrade is not available for this agent version"
    ),
    UpgradeCode.NEW_VERSION_LEES_OR_EQUAL_THAT_CURRENT: "Current agent version is greater or equal",
    UpgradeCode.NEW_VERSION_GREATER_MASTER: (
        "Upgrading an agent to a version higher than the manager requires the force flag"
    ),
    UpgradeCode.URL_NOT_FOUND: "The repository is not reachable",
    UpgradeCode.WPK_VERSION_DOES_NOT_EXIST: (
        "The version of the WPK does not exist in the repository"
    ),
    UpgradeCode.WPK_FILE_DOES_NOT_EXIST: "The WPK file does not exist",
    UpgradeCode.WPK_SHA1_DOES_NOT_MATCH: "The WPK sha1 of the file is not valid",
    UpgradeCode.SEND_LOCK_RESTART_ERROR: "Send lock restart error",
    UpgradeCode.SEND_OPEN_ERROR: "Send open file error",
    UpgradeCode.SEND_WRITE_ERROR: "Send write file error",
    UpgradeCode.SEND_CLOSE_ERROR: "Send close file error",
    UpgradeCode.SEND_SHA1_ERROR: "Send verify sha1 error",
    UpgradeCode.SEND_UPGRADE_ERROR: "Send upgrade command error",
    UpgradeCode.UPGRADE_ERROR: "Upgrade procedure exited with error code",
    UpgradeCode.UPGRADE_ERROR_MISSING_PACKAGE: (
        "Upgrade procedure exited with error code, missing dependency in agent"
    ),
    UpgradeCode.UNKNOWN_ERROR: "Upgrade procedure could not start",
}


class TaskCode(IntEnum):
    """Task-manager codes (reference §3.2)."""

    SUCCESS = 0
    INVALID_MESSAGE = 1
    INVALID_COMMAND = 2
    NO_TASK = 3
    DATABASE_ERROR = 4
    PARSE_DB_RESPONSE_ERROR = 5
    DB_REQUEST_ERROR = 6
    UNKNOWN_ERROR = 7
    #: Ours (the ``upgrade_cancel`` extension): the ``upgrade`` command was sent to the agent.
    INSTALLER_STARTED = 8


TASK_MESSAGES: dict[TaskCode, str] = {
    TaskCode.SUCCESS: "Success",
    TaskCode.INVALID_MESSAGE: "Invalid message",
    TaskCode.INVALID_COMMAND: "Invalid command",
    TaskCode.NO_TASK: "No task in DB",
    TaskCode.DATABASE_ERROR: "Database error",
    TaskCode.PARSE_DB_RESPONSE_ERROR: "Parse DB response error",
    TaskCode.DB_REQUEST_ERROR: "Error in DB request",
    TaskCode.UNKNOWN_ERROR: "Unknown error",
    TaskCode.INSTALLER_STARTED: "Task is already being installed, cannot be cancelled",
}


class AgentCode(IntEnum):
    """Agent command-handler codes (reference §3.3)."""

    OK = 0
    DISABLED = 1
    COMMAND_NOT_FOUND = 2
    REQUIRED_PARAMETERS = 3
    UNSUPPORTED_MODE = 4
    INVALID_FILE_NAME = 5
    FILE_OPEN_ERROR = 6
    FILE_NOT_OPENED = 7
    NO_FILE_OPENED = 8
    TARGET_FILE_MISMATCH = 9
    CANNOT_WRITE = 10
    CANNOT_CLOSE = 11
    CANNOT_SHA1 = 12
    SIGNATURE = 13
    UNCOMPRESS = 14
    CLEAN_UPGRADE_DIR = 15
    UNMERGE = 16
    CHMOD = 17
    EXECUTE = 18
    ERASE_RESULT = 19


AGENT_MESSAGES: dict[AgentCode, str] = {
    AgentCode.OK: "ok",
    AgentCode.DISABLED: "Upgrade module is disabled or not ready yet",
    AgentCode.COMMAND_NOT_FOUND: "Command not found",
    AgentCode.REQUIRED_PARAMETERS: "Required parameters were not found",
    AgentCode.UNSUPPORTED_MODE: "Unsupported file mode",
    AgentCode.INVALID_FILE_NAME: "Invalid file name",
    AgentCode.FILE_OPEN_ERROR: "File Open Error: ",
    AgentCode.FILE_NOT_OPENED: (
        "File not opened. Agent might have been auto-restarted during upgrade"
    ),
    AgentCode.NO_FILE_OPENED: "No file opened",
    AgentCode.TARGET_FILE_MISMATCH: "The target file doesn't match the opened file",
    AgentCode.CANNOT_WRITE: "Cannot write file",
    AgentCode.CANNOT_CLOSE: "Cannot close file",
    AgentCode.CANNOT_SHA1: "Cannot generate SHA1",
    AgentCode.SIGNATURE: "Could not verify signature",
    AgentCode.UNCOMPRESS: "Could not uncompress package",
    AgentCode.CLEAN_UPGRADE_DIR: "Could not clean up upgrade directory",
    AgentCode.UNMERGE: "Error unmerging file",
    AgentCode.CHMOD: "Could not chmod",
    AgentCode.EXECUTE: "Error executing command",
    AgentCode.ERASE_RESULT: "Could not erase upgrade_result file",
}


def upgrade_message(code: UpgradeCode | int) -> str:
    """Reference text of an upgrade-module code."""
    return UPGRADE_MESSAGES[UpgradeCode(code)]


def task_message(code: TaskCode | int) -> str:
    """Reference text of a task-manager code."""
    return TASK_MESSAGES[TaskCode(code)]


def agent_message(code: AgentCode | int) -> str:
    """Reference text of an agent command-handler code."""
    return AGENT_MESSAGES[AgentCode(code)]


class WpkUpgradeError(Exception):
    """Base of every error this project raises on purpose. ``str()`` is one clear line."""


class ConfigError(WpkUpgradeError):
    """A configuration file is invalid. The message names the file, the key path and the fault."""


class PluginError(WpkUpgradeError):
    """A driver or plugin cannot be found, loaded or configured (names the missing extra)."""


class ProtocolError(WpkUpgradeError):
    """A peer broke the wire format (bad frame, oversized message, unexpected message type)."""


#: Longest ``detail`` kept: details quote peers (an agent's answer, a requested path or
#: version) and end up in log lines, task histories and replies.
MAX_DETAIL = 1000


class CodedError(WpkUpgradeError):
    """An error that maps to one catalogue code; ``detail`` is our precise reason (cut to
    ``MAX_DETAIL`` characters, saying how much was cut)."""

    code: IntEnum

    def __init__(self, code: IntEnum, detail: str = "") -> None:
        if len(detail) > MAX_DETAIL:
            detail = f"{detail[:MAX_DETAIL]}... [{len(detail) - MAX_DETAIL} more characters cut]"
        self.code = code
        self.detail = detail
        super().__init__(self.text + (f" ({detail})" if detail else ""))

    @property
    def text(self) -> str:
        """The reference text of the code (without our detail)."""
        raise NotImplementedError


class UpgradeError(CodedError):
    """An upgrade-module failure (code from ``UpgradeCode``)."""

    def __init__(self, code: UpgradeCode | int, detail: str = "") -> None:
        super().__init__(UpgradeCode(code), detail)

    @property
    def text(self) -> str:
        return upgrade_message(self.code)


class TaskError(CodedError):
    """A task-manager failure (code from ``TaskCode``)."""

    def __init__(self, code: TaskCode | int, detail: str = "") -> None:
        super().__init__(TaskCode(code), detail)

    @property
    def text(self) -> str:
        return task_message(self.code)


class AgentCommandError(CodedError):
    """An agent command-handler failure (code from ``AgentCode``)."""

    def __init__(self, code: AgentCode | int, detail: str = "", text: str | None = None) -> None:
        self._text = text
        super().__init__(AgentCode(code), detail)

    @property
    def text(self) -> str:
        return self._text if self._text is not None else agent_message(self.code)


class WpkError(AgentCommandError):
    """A WPK failed a format, trust or unpacking check.

    ``code`` is the agent-side code of the failed step (13 signature/format/trust,
    14 decompression, 15 cleaning, 16 unmerging, 5 installer path); ``detail`` says which
    check failed and, where it applies, which member.
    """
