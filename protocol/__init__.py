"""EdgeGuide wire package shared by the server and the device agent.

Topics, message schemas, chunk framing, signed manifests and the artifact container live here and
only here, so both ends agree byte for byte. It imports the standard library and `cryptography`
only: the agent must stay free of TensorFlow.
"""

from protocol.errors import ProtocolError, SignatureError
from protocol.limits import Limits
from protocol.topics import Topics

__all__ = ["Limits", "ProtocolError", "SignatureError", "Topics"]
