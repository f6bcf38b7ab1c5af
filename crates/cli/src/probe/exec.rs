//! A target that executes a new program while attached: the probes went with the old
//! image, so the session is over — cleanly, whichever backend placed them. The ptrace
//! tracer sees the exec (`PTRACE_EVENT_EXEC`) and says so; the agent cannot (its socket is
//! closed by the exec, being close-on-exec), so a session whose agent went away while the
//! process lives on checks whether the agent is still mapped in it.

/// Whether the ptrace tracer's `!detached` text says the program executed a new image.
pub(crate) fn is_exec_note(problem: &str) -> bool {
    problem == dynprobe_uprobes::EXEC_NOTE
}

/// Whether process `pid` no longer has the agent library mapped: it executed a new image
/// (the agent never unloads itself while a session is open).
pub(crate) fn agent_gone(pid: i32, agent: &std::path::Path) -> bool {
    let Some(file) = agent.file_name().and_then(|f| f.to_str()) else { return false };
    std::fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|maps| !maps.contains(file))
}

/// The message for process `pid`, once named `name`, having executed a new image.
pub(crate) fn note(pid: i32, name: &str) -> String {
    let now = std::fs::read_to_string(format!("/proc/{pid}/comm")).map(|c| c.trim_end().to_string());
    let became = match now {
        Ok(now) if now != name => format!(" (now {now})"),
        _ => String::new(),
    };
    format!(
        "{pid} ({name}) executed a new program{became}: its probes went with the old image, so the \
         session is over; it runs on without them"
    )
}
