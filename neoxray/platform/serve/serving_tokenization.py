"""vLLM's tokenizer routes, which lm-evaluation-harness's remote tokenizer uses: POST /tokenize, POST /detokenize
and GET /tokenizer_info, with the served model's tokenizer, on the tokenizer threads."""

from __future__ import annotations

from neoxray.platform.serve.api_errors import ApiError
from neoxray.platform.serve.body import Routes
from neoxray.platform.serve.context import ServingContext, check_unicode
from neoxray.platform.serve.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)


class TokenizationServing:
    """The tokenization API over the shared request context."""

    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    def routes(self, routes: Routes) -> Routes:
        routes.get("/tokenizer_info", self.tokenizer_info, TokenizerInfo)
        routes.post("/tokenize", TokenizeRequest, self.tokenize, TokenizeResponse)
        routes.post("/detokenize", DetokenizeRequest, self.detokenize, DetokenizeResponse)
        return routes

    async def tokenizer_info(self) -> TokenizerInfo:
        ctx = self.ctx
        await ctx.ready()
        tok = ctx.tokenizer
        eod = tok.decode([ctx.info.eod_id])
        return TokenizerInfo(
            eos_token=eod,
            bos_token=eod,
            pad_token=tok.decode([tok.pad_id]),
            model_max_length=ctx.info.max_seq_len,
            tokenizer_class="GPTNeoXTokenizer",
            vocab_size=tok.vocab_size,
        )

    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        ctx = self.ctx
        await ctx.ready()
        await ctx.resolve_model(body.model)

        def work():
            check_unicode(body.prompt, "prompt")
            return ctx.tokenizer.encode_batch([body.prompt])[0]

        ids = await ctx.off_loop(work)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=ctx.info.max_seq_len)

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        ctx = self.ctx
        await ctx.ready()
        await ctx.resolve_model(body.model)
        vocab = ctx.tokenizer.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"tokens has ids outside the vocabulary [0, {vocab}): {bad[:5]}", param="tokens")
        return DetokenizeResponse(prompt=await ctx.off_loop(ctx.tokenizer.decode, body.tokens))
