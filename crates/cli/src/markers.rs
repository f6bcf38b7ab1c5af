//! `dynprobe list-markers`: the static markers of a program file or of every module of a
//! running process, like `perf list sdt` or `bpftrace -l 'usdt:…'` — dynprobe's own markers
//! (`marker!`, `dynprobe/marker.h`) with their argument types, and plain SDT probes
//! (`sys/sdt.h`) with what their notes say.

use std::fmt::Write as _;
use std::path::PathBuf;

use dynprobe_symbols::{read_markers, MarkerSite, SymbolTable};

/// Arguments of `dynprobe list-markers`.
#[derive(clap::Args, Debug)]
pub struct ListMarkersArgs {
    /// The program (an ELF file) whose markers to list, at link-time addresses.
    #[arg(value_name = "PROG", required_unless_present = "pid", conflicts_with = "pid")]
    program: Option<PathBuf>,

    /// List the markers of every module mapped in process PID, at runtime addresses.
    #[arg(short, long, value_name = "PID")]
    pid: Option<i32>,
}

/// Prints the markers `args` asks for.
pub fn run(args: &ListMarkersArgs) -> Result<(), String> {
    let sites = match (&args.program, args.pid) {
        (_, Some(pid)) => process_markers(pid)?,
        (Some(program), None) => read_markers(program).map_err(|e| e.to_string())?,
        (None, None) => unreachable!("clap requires PROG or --pid"),
    };
    if sites.is_empty() {
        let what = match args.pid {
            Some(pid) => format!("process {pid}"),
            None => args.program.as_ref().expect("PROG without --pid").display().to_string(),
        };
        eprintln!("dynprobe: no markers in {what}");
        return Ok(());
    }
    print!("{}", table(&sites));
    Ok(())
}

/// The markers of every module mapped in process `pid` (its `/proc/PID/maps`).
fn process_markers(pid: i32) -> Result<Vec<MarkerSite>, String> {
    let table = SymbolTable::for_pid(pid).map_err(|e| e.to_string())?;
    let mut sites = Vec::new();
    for module in 0..table.modules().len() {
        sites.extend(table.markers(module).map_err(|e| e.to_string())?);
    }
    Ok(sites)
}

/// One line per site: `provider:name`, address, file offset, origin, arguments, file.
fn table(sites: &[MarkerSite]) -> String {
    let rows: Vec<[String; 6]> = sites
        .iter()
        .map(|site| {
            let args: Vec<String> = site.args.iter().map(ToString::to_string).collect();
            [
                site.spec(),
                format!("{:#x}", site.addr),
                format!("{:#x}", site.file_offset),
                if site.dynprobe { "dynprobe" } else { "sdt" }.to_string(),
                if args.is_empty() { "-".to_string() } else { args.join(", ") },
                site.path.display().to_string(),
            ]
        })
        .collect();
    let header = ["MARKER", "ADDRESS", "OFFSET", "KIND", "ARGUMENTS", "FILE"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(header.map(str::to_string)).chain(rows) {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynprobe_symbols::{ArgKind, ArgLocation, MarkerArg};

    #[test]
    fn the_table_aligns_one_site_per_line() {
        let site = |name: &str, args: Vec<MarkerArg>, dynprobe: bool| MarkerSite {
            provider: "app".into(),
            name: name.into(),
            addr: 0x1149,
            file_offset: 0x149,
            path: "/bin/app".into(),
            semaphore: 0,
            args,
            dynprobe,
            sdt_args: String::new(),
            gates: Vec::new(),
        };
        let reg = |name, size| ArgLocation::Register { name, size };
        let text = table(&[
            site(
                "tick",
                vec![
                    MarkerArg { kind: ArgKind::U32, location: reg("rdi", 4), length: None },
                    MarkerArg { kind: ArgKind::Str, location: reg("rsi", 8), length: Some(reg("rdx", 8)) },
                ],
                true,
            ),
            site("idle", vec![], false),
        ]);
        assert_eq!(
            text,
            "MARKER    ADDRESS  OFFSET  KIND      ARGUMENTS                 FILE\n\
             app:tick  0x1149   0x149   dynprobe  u32 %edi, &str %rsi,%rdx  /bin/app\n\
             app:idle  0x1149   0x149   sdt       -                         /bin/app\n"
        );
    }
}
