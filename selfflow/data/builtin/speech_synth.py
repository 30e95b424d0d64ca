"""Speech synthesis with espeak-ng, bundled by the `espeakng-loader` wheel and called
through ctypes."""

from __future__ import annotations

import ctypes

import numpy as np

MISSING = (
    "the built-in spoken digits need the espeak-ng speech synthesiser, which the espeakng-loader "
    "package bundles: pip install espeakng-loader (or use data=audio_folder data.root=PATH "
    "with your own recordings)"
)

AUDIO_OUTPUT_SYNCHRONOUS, POS_CHARACTER, CHARS_UTF8 = 2, 1, 1
PARAMETER = {"rate": 1, "volume": 2, "pitch": 3, "range": 4}  # espeak_PARAMETER values
SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class Espeak:
    """One espeak-ng engine (the library keeps global state, so use one per process): text ->
    int16 samples."""

    _instance: Espeak | None = None

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError as error:
            raise ModuleNotFoundError(MISSING) from error
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Initialize.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        self.sample_rate = self.lib.espeak_Initialize(
            AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0
        )
        if self.sample_rate <= 0:
            raise RuntimeError(
                f"espeak-ng failed to initialise from {espeakng_loader.get_data_path()}"
            )
        self._chunks: list[np.ndarray] = []
        self._callback = SynthCallback(
            self._collect
        )  # kept referenced: espeak calls it during synthesis
        self.lib.espeak_SetSynthCallback(self._callback)

    @classmethod
    def get(cls) -> Espeak:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def _collect(self, wav, num_samples: int, events) -> int:
        if num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0

    def say(
        self, text: str, voice: str = "en", rate: int = 175, pitch: int = 50, pitch_range: int = 50
    ) -> np.ndarray:
        """int16 samples [S] at `self.sample_rate`; voice e.g. `en+f3` (language + variant), rate
        in words/min."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(
                f"espeak-ng has no voice {voice!r}; use a language with a variant, e.g. 'en+m3'"
            )
        for name, value in (("rate", rate), ("pitch", pitch), ("range", pitch_range)):
            self.lib.espeak_SetParameter(PARAMETER[name], int(value), 0)
        self._chunks = []
        data = text.encode() + b"\0"
        if self.lib.espeak_Synth(data, len(data), 0, POS_CHARACTER, 0, CHARS_UTF8, None, None) != 0:
            raise RuntimeError(f"espeak-ng could not synthesise {text!r}")
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
