"""capsd: a supervised process-pool speech-recognition server for CapsWriter-Offline clients."""

__version__ = "0.1.0"
