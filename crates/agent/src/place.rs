//! Placing one parsed probe spec in this process: `@SYMBOL`s resolved, the event format
//! built, an entry probe (`p`) or a return probe (`r`) registered with the handlers of
//! [`Event`], or every site of a marker (`m`) with the handler of [`MarkerEvent`].

use crate::channel::Channel;
use crate::event::Event;
use crate::marker::MarkerEvent;
use dynprobe::spec::{ProbeKind, ProbeSpec, Target};
use dynprobe::{Marker, MarkerHandle, Probe, ProbeHandle, ReturnProbe, ReturnProbeHandle, DEFAULT_MAXACTIVE};
use dynprobe_symbols::SymbolTable;
use std::sync::Arc;

/// A placed probe of either kind.
#[derive(Debug)]
pub enum Placed {
    /// A `p` spec's probe.
    Entry(ProbeHandle),
    /// An `r` spec's return probe.
    Return(ReturnProbeHandle),
    /// An `m` spec's probes, one on each site of the marker.
    Marker(MarkerHandle),
}

impl Placed {
    /// The probe's line of the listing (for `r`, its entry probe's): address, symbol,
    /// whether it is jump-optimized. Panics when called from inside a handler. (Only the
    /// tests ask yet; a listing of attached probes would.)
    #[cfg(test)]
    pub fn info(&self) -> dynprobe::ProbeInfo {
        match self {
            Placed::Entry(handle) => handle.info(),
            Placed::Return(handle) => handle.info(),
            Placed::Marker(_) => panic!("a marker's probes have one line each"),
        }
    }

    /// Where the probe is, for a message: `symbol+offset (0xaddress)`, or the number of a
    /// marker's sites.
    pub fn location(&self) -> String {
        let info = match self {
            Placed::Entry(handle) => handle.info(),
            Placed::Return(handle) => handle.info(),
            Placed::Marker(handle) => return format!("the {} sites of its marker", handle.sites().count()),
        };
        format!("{} ({:#x})", info.symbol, info.addr)
    }

    /// Whether the probe is still in place (an [`Placed::unregister`] that failed leaves it
    /// so, to be tried again).
    pub fn is_registered(&self) -> bool {
        match self {
            Placed::Entry(handle) => handle.is_registered(),
            Placed::Return(handle) => handle.is_registered(),
            Placed::Marker(handle) => handle.sites().next().is_some(),
        }
    }

    /// The entry probe that arms it ([`place`] registers it disarmed): a `p` spec's probe,
    /// an `r` spec's entry probe; none for a marker's, which are armed already.
    pub fn entry_probe(&self) -> Option<&ProbeHandle> {
        match self {
            Placed::Entry(handle) => Some(handle),
            Placed::Return(handle) => Some(handle.entry_probe()),
            Placed::Marker(_) => None,
        }
    }

    /// Removes the probe, restoring the patched bytes. On an error the probe stays placed,
    /// armed and working, and another call tries again (a thread that blocked the stop
    /// signal may have let it in since).
    pub fn unregister(&mut self) -> Result<(), String> {
        match self {
            Placed::Entry(handle) => handle.try_unregister().map(drop).map_err(|e| e.to_string()),
            Placed::Return(handle) => handle.try_unregister().map(drop).map_err(|e| e.to_string()),
            Placed::Marker(handle) => handle.try_detach().map(drop).map_err(|e| e.to_string()),
        }
    }
}

/// Places `spec`, whose hits go to `channel` as event lines. Its `@SYMBOL`s are looked up
/// in the modules loaded now (data objects, then functions), and so are the sites of a
/// marker (an unknown one is refused with the nearest names).
/// A `p` or `r` probe is registered disarmed: [`dynprobe::prepare_optimization`] first
/// (so that the agent's own calls never trap on it while the optimizer decodes its module),
/// then its [`Placed::entry_probe`] is enabled, directly as its jump where it can be one. A
/// marker's probes are armed and optimized already.
pub fn place(spec: &ProbeSpec, channel: Channel) -> Result<Placed, String> {
    let mut spec = spec.clone();
    if spec.needs_symbols() {
        let mut resolver = Resolver::current_process()?;
        spec.resolve_symbols(|name| resolver.lookup(name))?;
    }
    let location = match &spec.location {
        Target::Code(location) => location.clone(),
        Target::Marker(marker) => {
            let sites = Marker::find(marker).map_err(|e| e.to_string())?;
            let event = MarkerEvent::new(&spec, &sites, channel)?;
            let handle = Marker::attach_sites(sites, move |hit| event.hit(hit)).map_err(|e| e.to_string())?;
            return Ok(Placed::Marker(handle));
        }
    };
    let event = Arc::new(Event::new(&spec, channel)?);
    let placed = match spec.kind {
        ProbeKind::Entry | ProbeKind::Marker => {
            let vectors = event.reads_vectors();
            let probe = Probe::at(location).on_hit(move |regs| event.hit(regs)).disabled();
            match vectors {
                true => probe.reads_vectors(),
                false => probe,
            }
            .register()
            .map(Placed::Entry)
        }
        ProbeKind::Return => {
            let at_entry = event.clone();
            let vectors = event.reads_vectors();
            let probe = ReturnProbe::at(location)
                .maxactive(spec.maxactive.unwrap_or(DEFAULT_MAXACTIVE))
                .on_entry(move |regs, data| at_entry.enter(regs, data))
                .on_return(move |regs, data| event.returned(regs, data))
                .disabled();
            match vectors {
                true => probe.reads_vectors(),
                false => probe,
            }
            .register()
            .map(Placed::Return)
        }
    };
    placed.map_err(|e| e.to_string())
}

/// Resolves the `@SYMBOL`s of one spec: data objects (global variables, which the
/// function table leaves out) first, read from the module files' symbol tables once each,
/// then functions from the table.
struct Resolver {
    table: SymbolTable,
    /// Per module (index as in the table): its defined data objects, once read.
    objects: Vec<Option<Vec<DataObject>>>,
}

/// A defined data symbol (`STT_OBJECT`) of a module.
struct DataObject {
    name: String,
    /// The runtime address.
    addr: u64,
    /// Exported (in `.dynsym`): the dynamic linker binds every module's references to it.
    exported: bool,
}

impl Resolver {
    fn current_process() -> Result<Resolver, String> {
        let table = SymbolTable::current_process().map_err(|e| e.to_string())?;
        let objects = table.modules().iter().map(|_| None).collect();
        Ok(Resolver { table, objects })
    }

    /// The address of `[module:]name`.
    fn lookup(&mut self, spec: &str) -> Result<u64, String> {
        let (module, name) = match spec.split_once(':') {
            Some((module, name)) if !module.is_empty() && !name.starts_with(':') => (Some(module), name),
            _ => (None, spec),
        };
        let in_scope: Vec<usize> = (0..self.table.modules().len())
            .filter(|&i| module.is_none_or(|wanted| self.table.modules()[i].is_named(wanted)))
            .collect();
        for i in in_scope {
            let Some(found) = self.objects(i).iter().find(|o| o.name == name) else { continue };
            let (addr, exported) = (found.addr, found.exported);
            // An executable that uses a library's variable has its own copy of it (a copy
            // relocation), which the library's code uses too: that copy is the variable.
            if exported && !self.table.modules()[i].is_main {
                if let Some(main) = self.table.modules().iter().position(|m| m.is_main) {
                    if let Some(copy) = self.objects(main).iter().find(|o| o.exported && o.name == name) {
                        return Ok(copy.addr);
                    }
                }
            }
            return Ok(addr);
        }
        self.table.lookup(spec).map(|symbol| symbol.addr).map_err(|e| e.to_string())
    }

    /// The data objects of module `i`, read from its file the first time (none when it
    /// cannot be read, as the vdso).
    fn objects(&mut self, i: usize) -> &[DataObject] {
        let module = &self.table.modules()[i];
        self.objects[i].get_or_insert_with(|| read_objects(&module.path, module.bias))
    }
}

/// The defined data objects of the ELF file at `path` loaded with `bias`, from `.symtab`
/// and `.dynsym`.
fn read_objects(path: &std::path::Path, bias: u64) -> Vec<DataObject> {
    use object::{Object, ObjectSymbol, SymbolKind};
    let Ok(data) = std::fs::read(path) else { return Vec::new() };
    let Ok(file) = object::File::parse(&*data) else { return Vec::new() };
    let defined = |s: &object::Symbol| s.kind() == SymbolKind::Data && s.is_definition();
    let mut objects: Vec<DataObject> = file
        .dynamic_symbols()
        .filter(defined)
        .filter_map(|s| Some(DataObject { name: s.name().ok()?.to_string(), addr: s.address(), exported: true }))
        .collect();
    objects.extend(
        file.symbols()
            .filter(defined)
            .filter_map(|s| Some(DataObject { name: s.name().ok()?.to_string(), addr: s.address(), exported: false })),
    );
    for object in &mut objects {
        object.addr = object.addr.wrapping_add(bias);
    }
    objects
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A global of this test binary, found as a data symbol.
    #[no_mangle]
    static DYNPROBE_AGENT_TEST_GLOBAL: u64 = 0x5eed;

    #[test]
    fn data_symbols_resolve_to_their_runtime_address() {
        let mut resolver = Resolver::current_process().unwrap();
        let addr = resolver.lookup("DYNPROBE_AGENT_TEST_GLOBAL").unwrap();
        assert_eq!(addr, std::ptr::addr_of!(DYNPROBE_AGENT_TEST_GLOBAL) as u64);
        // A library's variable: where its code reads it (through its GOT, a copy in the
        // executable or its own).
        let environ = std::ptr::addr_of!(libc_environ) as u64;
        assert_eq!(resolver.lookup("libc:environ").unwrap(), environ);
        // Functions come from the table.
        let malloc = resolver.table.lookup("libc:malloc").unwrap().addr;
        assert_eq!(resolver.lookup("libc:malloc").unwrap(), malloc);
        let err = resolver.lookup("no_such_symbol_anywhere").unwrap_err();
        assert!(err.contains("no_such_symbol_anywhere"), "{err}");
        let err = resolver.lookup("libnosuchmodule:x").unwrap_err();
        assert!(err.contains("libnosuchmodule"), "{err}");
    }

    /// The function the return probe test probes: long enough to be jump-optimized.
    #[no_mangle]
    #[inline(never)]
    extern "C" fn dynprobe_agent_test_work(seed: u64, out: &mut u32) -> i64 {
        let mut h = std::hint::black_box(seed);
        for i in 0..std::hint::black_box(8) {
            h = h.wrapping_mul(31).wrapping_add(i);
        }
        *out = (h & 0xffff) as u32;
        -(seed as i64)
    }

    #[test]
    fn a_return_spec_is_optimized_and_reports_every_call() {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 stores.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) }, 0);
        let channel = Channel::new(fds[1]).unwrap();
        let spec = ProbeSpec::parse(
            "r:ev dynprobe_agent_test_work ret=$retval:s64 seed=$arg1 out=+0($arg2):u32 t=$duration \
             g=@DYNPROBE_AGENT_TEST_GLOBAL:x64",
        )
        .unwrap();
        let placed = place(&spec, channel).unwrap();
        dynprobe::prepare_optimization().unwrap();
        dynprobe::ProbeHandle::enable_each(&[placed.entry_probe().unwrap()]).unwrap();
        let info = placed.info();
        assert!(info.optimized, "not optimized: {:?}", info.not_optimized);
        let mut outs = Vec::new();
        for seed in [3u64, 40] {
            let mut out = 0;
            assert_eq!(dynprobe_agent_test_work(seed, &mut out), -(seed as i64));
            outs.push(out);
        }
        let mut placed = placed;
        placed.unregister().unwrap();
        let mut buf = [0u8; 4096];
        // SAFETY: reads into `buf`, writable for its length, from our pipe.
        let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
        // SAFETY: closes the two descriptors made above.
        unsafe { (libc::close(fds[0]), libc::close(fds[1])) };
        let lines = String::from_utf8_lossy(&buf[..usize::try_from(n).unwrap()]).into_owned();
        let lines: Vec<&str> = lines.lines().collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        for (line, (seed, out)) in lines.iter().zip([3u64, 40].into_iter().zip(outs)) {
            let (head, t) = line.rsplit_once(" t=").unwrap();
            let (t, g) = t.split_once(' ').unwrap();
            assert!(t.parse::<u64>().unwrap() > 0, "{line}");
            assert_eq!(g, "g=0x5eed");
            let fields = head.splitn(3, ' ').nth(2).unwrap();
            assert_eq!(fields, format!("ev ret=-{seed} seed={seed} out={out}"));
        }
    }

    extern "C" {
        #[link_name = "environ"]
        static libc_environ: *const *const libc::c_char;
    }
}
