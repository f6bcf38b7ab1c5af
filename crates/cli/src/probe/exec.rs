//! A target that executes a new program while attached: the probes went with the old
//! image, so the session is over — cleanly, whichever backend placed them. The ptrace
//! tracer sees the exec (`PTRACE_EVENT_EXEC`) and says so; the agent cannot (its socket is
//! closed by the exec, being close-on-exec), so a session whose agent went away while the
//! process lives on checks whether the agent is still mapped where it was. `record -p` is
//! the exception: its `exec`s carry the agent and the recording's settings (as a program
//! `record` started does), so the new image records itself into the same trace, and the
//! recording goes on until the process exits.

/// Whether the ptrace tracer's `!detached` text says the program executed a new image.
pub(crate) fn is_exec_note(problem: &str) -> bool {
    problem == dynprobe_uprobes::EXEC_NOTE
}

/// The first line of process `pid`'s `/proc/PID/maps` (proc(5)) that maps the agent
/// library, once it is loaded.
pub(crate) fn agent_mapping(pid: i32, agent: &std::path::Path) -> Option<String> {
    let file = agent.file_name()?.to_str()?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    maps.lines().find(|line| line.contains(file)).map(str::to_string)
}

/// Whether process `pid` executed a new image since the agent was mapped as `mapping` said
/// ([`agent_mapping`]): that mapping is gone (the agent never unloads itself while a
/// session is open). An image exec'd during `record -p` maps the agent too (its `exec`
/// carried `LD_PRELOAD`), at another address: the mapping's line tells them apart. Without
/// it, whether the agent is mapped at all.
pub(crate) fn executed(pid: i32, agent: &std::path::Path, mapping: Option<&str>) -> bool {
    let Some(file) = agent.file_name().and_then(|f| f.to_str()) else { return false };
    std::fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|maps| match mapping {
        Some(mapping) => !maps.lines().any(|line| line == mapping),
        None => !maps.contains(file),
    })
}

/// Waits until process `pid` exits, `deadline` passes or `interrupted` says so (Ctrl-C):
/// the end of a `record -p` whose process executed a new image, which records itself.
pub(crate) fn wait_for_end(
    pid: i32,
    pidfd: Option<&std::os::fd::OwnedFd>,
    deadline: Option<std::time::Instant>,
    interrupted: &dyn Fn() -> bool,
) {
    while !interrupted() && deadline.is_none_or(|at| std::time::Instant::now() < at) {
        // Waits up to 100 ms with a pidfd.
        if super::attach::exited(pid, pidfd) {
            return;
        }
        if pidfd.is_none() {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// The message for process `pid`, once named `name`, having executed a new image.
pub(crate) fn note(pid: i32, name: &str) -> String {
    let became = became(pid, name);
    format!(
        "{pid} ({name}) executed a new program{became}: its probes went with the old image, so the \
         session is over; it runs on without them"
    )
}

/// The message for process `pid`, once named `name`, having executed a new image during
/// `record -p`: that image records itself, as an image `exec`'d under `record` does.
pub(crate) fn recorded_note(pid: i32, name: &str) -> String {
    let became = became(pid, name);
    format!(
        "{pid} ({name}) executed a new program{became}: its exec carried the agent, so the new image is \
         recorded as under `record` until it exits, Ctrl-C or --duration (it keeps the agent; its recording, \
         and that of the children it forks, ends with the session)"
    )
}

/// ` (now NAME)` when process `pid` is now named otherwise than `name`.
fn became(pid: i32, name: &str) -> String {
    let now = std::fs::read_to_string(format!("/proc/{pid}/comm")).map(|c| c.trim_end().to_string());
    match now {
        Ok(now) if now != name => format!(" (now {now})"),
        _ => String::new(),
    }
}
