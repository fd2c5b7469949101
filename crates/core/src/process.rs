//! Process setup both binaries (`moeserve`, `moeserve-bench`) do first, before any other
//! thread exists, so that the benchmarks measure what the server runs.

/// Huge pages for the heap ([`reexec_with_huge_pages`]), and no extra spinning threads in
/// candle's own pool. Call first thing in `main`.
pub fn prepare() {
    reexec_with_huge_pages();
    // candle runs large elementwise ops on a pool of its own whose idle threads spin
    // before parking; next to rayon's pool, which already has a thread per core for the
    // matmuls and attention, that spinning takes a core away from them
    // (docs/MEASUREMENTS.md). Our elementwise ops are small, so candle's pool gets no
    // extra threads unless the user asks for them. (Set before any other thread exists.)
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Runs this binary again (same process, same arguments) with glibc's malloc told to ask
/// for transparent huge pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`), since glibc
/// reads its tunables only at start. Where THP is in `madvise` mode (the default on
/// Debian and many other distributions), weights, KV cache and activations would
/// otherwise sit on 4 KiB pages, and streaming hundreds of megabytes of weights per step
/// takes a TLB miss every 4 KiB (docs/MEASUREMENTS.md). Skipped when `GLIBC_TUNABLES` is
/// already set: set it, even empty,
/// to opt out. At most once (`MOESERVE_REEXEC` marks the second run), and never for a
/// privileged (setuid or file-capability) process, whose tunables glibc may drop.
pub fn reexec_with_huge_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        const MARK: &str = "MOESERVE_REEXEC";
        // SAFETY: getauxval only reads the process's auxiliary vector.
        let secure = unsafe { libc::getauxval(libc::AT_SECURE) } != 0;
        if secure || std::env::var_os("GLIBC_TUNABLES").is_some() || std::env::var_os(MARK).is_some() {
            return;
        }
        // The binary's own path rather than /proc/self/exe, so the process keeps its
        // name (`ps`, `top`) instead of becoming "exe".
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let mut args = std::env::args_os();
        let arg0 = args.next().unwrap_or_default();
        // `exec` returns only if it failed; then carry on as we are.
        let _ = std::process::Command::new(exe)
            .arg0(arg0)
            .args(args)
            .env("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
            .env(MARK, "1")
            .exec();
    }
}

/// Bytes this process may still allocate: the kernel's `MemAvailable` (free memory and
/// the page cache it can reclaim), or in a container whose cgroup (v2) sets a lower
/// limit, that limit less the cgroup's usage. `None` where neither can be read (not
/// Linux).
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let available = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())?
        * 1024;
    let read = |f: &str| {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{f}"))
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    // `memory.max` is "max" (no limit) or bytes; its usage counts the page cache, which
    // the cgroup reclaims first, so take its inactive file pages back off.
    let cgroup = read("memory.max")
        .zip(read("memory.current"))
        .map(|(max, current)| {
            let inactive = std::fs::read_to_string("/sys/fs/cgroup/memory.stat")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("inactive_file "))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
                .unwrap_or(0);
            max.saturating_sub(current.saturating_sub(inactive))
        });
    Some(cgroup.map_or(available, |c| c.min(available)))
}
