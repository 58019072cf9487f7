"""SGLang's own path from sampled token ids to stream chunks, run on the CPU without a GPU or subprocesses.

Stands in for the scheduler's forward pass only: the test picks each sampled token. Everything after that is
sglang's code: its `Req` decides when a request finishes (stop strings, stop tokens, EOS, length) and holds
back output whose tail could start a stop string; its `DetokenizerManager` turns token ids into text
increments (holding incomplete UTF-8, trimming matched stops); its `ReqState` accumulates them. The chunks are
assembled the way `TokenizerManager._handle_batch_output` and `_stream_one_response` assemble them in the
default (cumulative) streaming mode: `text` is the whole text so far, `output_ids` SGLang's live list while
the request runs and a copy in the last chunk, logprobs the live lists of (logprob, token_id, None) tuples.
"""

from __future__ import annotations

import asyncio
import types
from array import array
from typing import Any

from sglang.srt.managers.detokenizer_manager import DetokenizerManager
from sglang.srt.managers.schedule_batch import FINISH_ABORT, Req
from sglang.srt.managers.tokenizer_manager import ReqState, TokenizerManager
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.utils.hf_transformers.tokenizer import get_tokenizer


def sglang_tokenizer(model_path: str) -> Any:
    """The tokenizer as SGLang's scheduler and detokenizer load it (with its extra stop-token attributes)."""
    return get_tokenizer(model_path)


def _detokenizer(tokenizer: Any) -> DetokenizerManager:
    # The real class without its process and sockets: only the decode step runs.
    d = object.__new__(DetokenizerManager)
    d.tokenizer = tokenizer
    d.vocab_size = len(tokenizer)
    d.decode_status = {}
    d.disable_tokenizer_batch_decode = False
    d.is_tool_call_parser_gpt_oss = False
    d.tool_close_token_ids = set()
    return d


class SimulatedRequest:
    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: list[int],
        params: dict[str, Any],
        rid: str = "rid-0",
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        cached_tokens: int = 0,
    ) -> None:
        self.sampling = SamplingParams(**params)
        self.sampling.normalize(tokenizer)
        self.sampling.verify(len(tokenizer))
        self.req = Req(
            rid,
            "",
            array("q", prompt_ids),
            self.sampling,
            eos_token_ids={tokenizer.eos_token_id},
            vocab_size=len(tokenizer),
            stream=True,
            return_logprob=return_logprob,
            top_logprobs_num=top_logprobs_num,
        )
        self.req.tokenizer = tokenizer
        self.rid = rid
        self.prompt_tokens = len(prompt_ids)
        self.cached_tokens = cached_tokens
        self.return_logprob = return_logprob
        self.top_logprobs_num = top_logprobs_num
        self.state = ReqState(out_list=[], finished=False, event=asyncio.Event(), obj=None, time_stats=None)
        self._detokenizer = _detokenizer(tokenizer)
        self._logprobs: list[tuple[float, list[tuple[float, int]]]] = []
        self.finished = False

    def step(
        self, token: int, logprob: float = -0.5, top: list[tuple[float, int]] | None = None
    ) -> dict | None:
        """The scheduler sampled `token`: the chunk SGLang streams for it, or None while it holds output."""
        req = self.req
        req.output_ids.append(token)
        self._logprobs.append((logprob, top or [(logprob, token)]))
        req.update_finish_state(1)
        if not req.finished() and req.check_match_stop_str_prefix():
            return None  # the scheduler's stream hold: the tail may still become a stop string
        return self._emit()

    def abort(self, message: str = "Abort in waiting queue", status_code: int | None = None) -> dict:
        """The chunk `_handle_abort_req` builds: no prompt_tokens, no cached_tokens."""
        finish = (
            FINISH_ABORT(message, status_code).to_json()
            if status_code
            else {"type": "abort", "message": message}
        )
        self.finished = True
        return {
            "text": self.state.get_text(),
            "output_ids": self.state.output_ids,
            "meta_info": {
                "id": self.rid,
                "finish_reason": finish,
                "completion_tokens": len(self.state.output_ids),
            },
        }

    def _emit(self) -> dict:
        req, state = self.req, self.state
        finished = req.finished()
        if finished and req.finished_len is None:
            req.finished_len = len(req.output_ids)
        finish = req.finished_reason.to_json() if finished else None
        # OutputStreamer.accept
        through_stop = req.output_ids_through_stop
        new_ids = list(through_stop[req.send_token_offset :])
        sent_before = req.send_token_offset
        req.send_token_offset = len(through_stop)
        decode_ids, read_offset = req.init_incremental_detokenize()
        batch = types.SimpleNamespace(
            rids=[self.rid],
            decoded_texts=[req.decoded_text],
            decode_ids=[decode_ids[req.send_decode_id_offset :]],
            read_offsets=[read_offset],
            finished_reasons=[finish],
            no_stop_trim=[self.sampling.no_stop_trim],
            skip_special_tokens=[self.sampling.skip_special_tokens],
            spaces_between_special_tokens=[self.sampling.spaces_between_special_tokens],
        )
        req.send_decode_id_offset = len(decode_ids)
        (text_delta,) = self._detokenizer._decode_batch_token_id_output(batch)
        # TokenizerManager._handle_batch_output, non-incremental streaming
        state.append_text(text_delta)
        state.output_ids.extend(new_ids)
        meta = {
            "id": self.rid,
            "finish_reason": finish,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(through_stop),
            "cached_tokens": self.cached_tokens,
        }
        if self.return_logprob:
            self._add_logprobs(meta, sent_before, len(through_stop))
        self.finished = finished
        if finished:
            return {"text": state.get_text(), "output_ids": state.output_ids.copy(), "meta_info": meta}
        return {"text": state.get_text(), "output_ids": state.output_ids, "meta_info": meta}

    def _add_logprobs(self, meta: dict, start: int, end: int) -> None:
        state = self.state
        for logprob, top in self._logprobs[start:end]:
            state.output_token_logprobs_val.append(logprob)
            state.output_token_logprobs_idx.append(
                self.req.output_ids[len(state.output_token_logprobs_val) - 1]
            )
            state.output_top_logprobs_val.append([lp for lp, _ in top])
            state.output_top_logprobs_idx.append([t for _, t in top])
        # TokenizerManager.add_logprob_to_meta_info with return_text_in_logprobs=False
        manager = types.SimpleNamespace()
        manager.detokenize_logprob_tokens = lambda v, i, text: TokenizerManager.detokenize_logprob_tokens(
            manager, v, i, text
        )
        n = len(state.output_token_logprobs)
        state.output_token_logprobs.extend(
            TokenizerManager.detokenize_logprob_tokens(
                manager, state.output_token_logprobs_val[n:], state.output_token_logprobs_idx[n:], False
            )
        )
        meta["output_token_logprobs"] = state.output_token_logprobs
        if self.top_logprobs_num > 0:
            n = len(state.output_top_logprobs)
            state.output_top_logprobs.extend(
                TokenizerManager.detokenize_top_logprobs_tokens(
                    manager, state.output_top_logprobs_val[n:], state.output_top_logprobs_idx[n:], False
                )
            )
            meta["output_top_logprobs"] = state.output_top_logprobs
