//! Choosing the next token: sampling parameters (OpenAI's, plus vLLM's extensions) and
//! their validation, the logit processor chain, and the draw from the filtered
//! distribution, which never sorts the vocabulary.

/// `$vis fn $name(..) -> $ret` running `$body_fn`, an `#[inline(always)]` function of
/// plain loops, compiled for AVX-512 (with FMA) when the CPU has it and portable
/// otherwise: the model's kernels choose the same way at run time.
macro_rules! avx512_or_portable {
    ($(#[$meta:meta])* $vis:vis fn $name:ident $(<$lt:lifetime>)? ($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty = $body_fn:ident) => {
        $(#[$meta])*
        $vis fn $name $(<$lt>)? ($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512 $(<$lt>)? ($($arg: $ty),*) -> $ret {
                    $body_fn($($arg),*)
                }
                // SAFETY: the CPU has the features.
                return unsafe { avx512($($arg),*) };
            }
            $body_fn($($arg),*)
        }
    };
}

mod distribution;
mod logprobs;
mod params;
mod processors;
mod sampler;
mod select;

pub use logprobs::{argmax, argmax_excluding, log_softmax, token_logprob, TokenLogprob};
pub use params::{ParamError, Reasoning, SamplingParams, DEFAULT_MAX_N, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS};
pub use processors::{LogitsProcessors, StepConstraints, TokenMask};
pub use sampler::Sampler;
