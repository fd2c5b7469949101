//! Which instruction sets the CPU backend's kernels use, detected once at start.
//!
//! One binary runs everywhere: nothing is compiled for the build machine's CPU
//! (`-C target-cpu=native` is not needed, and the Docker image is the same on every
//! host). Each hot kernel family (the quantized matmul, activation quantization,
//! attention, norms, row passes, the small dense matmul) has a form per kernel set, and
//! the set is a value ([`Isa`]) chosen once and carried by the model
//! ([`Backend::Cpu`](crate::backend::Backend)): from `MOESERVE_CPU` when it is set, else
//! the best set the CPU has. Forcing a set is how every set is tested and benchmarked on
//! one machine.

use std::fmt;
use std::sync::OnceLock;

/// The environment variable that forces a kernel set.
pub const CPU_ENV: &str = "MOESERVE_CPU";

/// A kernel set: the instruction sets the CPU kernels are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AVX-512 F/BW/VL with FMA and F16C; VNNI (`vpdpwssd`) where present.
    Avx512,
    /// AVX2 with FMA and F16C; AVX-VNNI (`vpdpwssd` on 256-bit registers) where present.
    Avx2,
    /// aarch64 Advanced SIMD; `sdot` (dotprod) and `smmla` (i8mm) where present.
    Neon,
    /// Plain Rust that the compiler vectorises for the baseline of the target.
    Portable,
}

impl Isa {
    pub const ALL: [Isa; 4] = [Isa::Avx512, Isa::Avx2, Isa::Neon, Isa::Portable];

    /// The name `MOESERVE_CPU` takes, logs and metrics show.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Neon => "neon",
            Isa::Portable => "portable",
        }
    }

    /// Whether this CPU can run the set.
    pub fn supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                use std::arch::is_x86_feature_detected as has;
                has!("avx512f")
                    && has!("avx512bw")
                    && has!("avx512vl")
                    && has!("avx2")
                    && has!("fma")
                    && has!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                use std::arch::is_x86_feature_detected as has;
                has!("avx2") && has!("fma") && has!("f16c")
            }
            // Advanced SIMD is part of every aarch64 CPU (the target's baseline).
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// This set if the CPU runs it, else the portable one: what a kernel dispatches on, so
    /// that a set named in code on a CPU without it can never reach instructions the CPU
    /// lacks (the check is a load of a cached flag).
    #[inline]
    pub(crate) fn runnable(self) -> Isa {
        if self.supported() {
            self
        } else {
            Isa::Portable
        }
    }

    /// The best set this CPU runs.
    pub fn best() -> Isa {
        Isa::ALL
            .into_iter()
            .find(|i| i.supported())
            .unwrap_or(Isa::Portable)
    }

    /// Every set this CPU runs, best first (what the kernel tests compare).
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.supported()).collect()
    }

    /// The set a `MOESERVE_CPU` value names, if this CPU runs it.
    pub fn parse(s: &str) -> Result<Isa, String> {
        let s = s.trim().to_ascii_lowercase();
        if s.is_empty() || s == "auto" {
            return Ok(Isa::best());
        }
        let isa = Isa::ALL.into_iter().find(|i| i.name() == s).ok_or_else(|| {
            format!("{CPU_ENV}={s:?}: unknown kernel set (auto, avx512, avx2, neon or portable)")
        })?;
        if !isa.supported() {
            return Err(format!(
                "{CPU_ENV}={s}: this CPU cannot run the {s} kernels (it runs: {})",
                Isa::available()
                    .iter()
                    .map(|i| i.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(isa)
    }

    /// The set for this process: `MOESERVE_CPU` when set, else the best the CPU runs.
    /// Read once; an unknown or unsupported value is an error every time it is asked.
    pub fn selected() -> Result<Isa, String> {
        static SELECTED: OnceLock<Result<Isa, String>> = OnceLock::new();
        SELECTED
            .get_or_init(|| Isa::parse(&std::env::var(CPU_ENV).unwrap_or_default()))
            .clone()
    }

    /// The quantized matmul's kernel within this set: the set's best for this CPU.
    pub(crate) fn quant_kernel(self) -> QuantKernel {
        let has = Features::get();
        match self {
            Isa::Avx512 if has.avx512_vnni => QuantKernel::Avx512Vnni,
            Isa::Avx512 => QuantKernel::Avx512,
            Isa::Avx2 if has.avx_vnni => QuantKernel::Avx2Vnni,
            Isa::Avx2 => QuantKernel::Avx2,
            Isa::Neon if has.i8mm => QuantKernel::NeonI8mm,
            Isa::Neon if has.dotprod => QuantKernel::NeonDot,
            Isa::Neon => QuantKernel::Neon,
            Isa::Portable => QuantKernel::Portable,
        }
    }

    /// The optional extensions the set's kernels use on this CPU.
    pub fn extensions(self) -> Vec<&'static str> {
        let has = Features::get();
        match self {
            Isa::Avx512 => vec![(has.avx512_vnni, "vnni")],
            Isa::Avx2 => vec![(has.avx_vnni, "avx-vnni")],
            Isa::Neon => vec![(has.dotprod, "dotprod"), (has.i8mm, "i8mm")],
            Isa::Portable => vec![],
        }
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, name)| name)
        .collect()
    }

    /// The set with the optional extensions its kernels use on this CPU, as logged at
    /// start: `avx2 (avx-vnni)`, `neon (dotprod, i8mm)`.
    pub fn describe(self) -> String {
        let extras = self.extensions();
        if extras.is_empty() {
            self.name().to_string()
        } else {
            format!("{} ({})", self.name(), extras.join(", "))
        }
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The quantized matmul's kernels: each kernel set's, with and without its optional
/// dot-product extension. Every one this CPU runs is tested against [`Portable`]
/// (`QuantKernel::available`).
///
/// [`Portable`]: QuantKernel::Portable
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum QuantKernel {
    Avx512Vnni,
    Avx512,
    Avx2Vnni,
    Avx2,
    NeonI8mm,
    NeonDot,
    Neon,
    Portable,
}

impl QuantKernel {
    #[cfg(test)]
    pub(crate) const ALL: [QuantKernel; 8] = [
        QuantKernel::Avx512Vnni,
        QuantKernel::Avx512,
        QuantKernel::Avx2Vnni,
        QuantKernel::Avx2,
        QuantKernel::NeonI8mm,
        QuantKernel::NeonDot,
        QuantKernel::Neon,
        QuantKernel::Portable,
    ];

    /// Whether this CPU runs the kernel.
    pub(crate) fn supported(self) -> bool {
        let has = Features::get();
        match self {
            QuantKernel::Avx512Vnni => Isa::Avx512.supported() && has.avx512_vnni,
            QuantKernel::Avx512 => Isa::Avx512.supported(),
            QuantKernel::Avx2Vnni => Isa::Avx2.supported() && has.avx_vnni,
            QuantKernel::Avx2 => Isa::Avx2.supported(),
            QuantKernel::NeonI8mm => Isa::Neon.supported() && has.i8mm,
            QuantKernel::NeonDot => Isa::Neon.supported() && has.dotprod,
            QuantKernel::Neon => Isa::Neon.supported(),
            QuantKernel::Portable => true,
        }
    }

    #[cfg(test)]
    pub(crate) fn available() -> Vec<QuantKernel> {
        QuantKernel::ALL.into_iter().filter(|k| k.supported()).collect()
    }
}

/// Optional extensions, detected once.
#[derive(Debug, Clone, Copy, Default)]
struct Features {
    avx512_vnni: bool,
    avx_vnni: bool,
    dotprod: bool,
    i8mm: bool,
}

impl Features {
    fn get() -> Features {
        static FEATURES: OnceLock<Features> = OnceLock::new();
        *FEATURES.get_or_init(|| {
            #[allow(unused_mut)]
            let mut f = Features::default();
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                f.avx512_vnni = has!("avx512vnni");
                f.avx_vnni = has!("avxvnni");
            }
            #[cfg(target_arch = "aarch64")]
            {
                use std::arch::is_aarch64_feature_detected as has;
                f.dotprod = has!("dotprod");
                f.i8mm = has!("i8mm") && f.dotprod;
            }
            f
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_unsupported_sets_are_refused() {
        for isa in Isa::ALL {
            match Isa::parse(isa.name()) {
                Ok(got) => {
                    assert!(isa.supported());
                    assert_eq!(got, isa);
                }
                Err(e) => {
                    assert!(!isa.supported());
                    assert!(e.contains("cannot run"), "{e}");
                }
            }
        }
        assert_eq!(Isa::parse("").unwrap(), Isa::best());
        assert_eq!(Isa::parse(" AUTO ").unwrap(), Isa::best());
        assert!(Isa::parse("sse9").unwrap_err().contains("unknown kernel set"));
        assert!(Isa::Portable.supported());
        assert!(Isa::available().contains(&Isa::best()));
        // One architecture's sets only.
        assert!(!(Isa::Neon.supported() && Isa::Avx2.supported()));
        for isa in Isa::available() {
            assert!(isa.quant_kernel().supported(), "{isa}");
        }
    }
}
