//! A thread's entries and exits paired into its call tree: the one structure `replay`,
//! `report` and `export` read.
//!
//! Pairing uses the depth the agent recorded with each event, so an exit closes the open
//! call of the same function *at the same depth*. The cases a plain stack would get wrong:
//!
//! - **Exit without entry**: the function was already running when recording started (a
//!   forked child returns out of the calls its parent made before `fork`). The call gets an
//!   unknown beginning and adopts the calls just before it that are deeper than it: they
//!   ran inside it. In the forked child, the caller's exit then adopts the callee's.
//! - **Open calls skipped by an exit** (their exits were lost with a full ring): they stay
//!   without an end, and the exit closes the call it names.
//! - **Calls still open at the end** (the program exited or was killed inside them): no end.
//! - **Unwound** calls (`longjmp`, exceptions) end when the agent noticed it.
//! - **Calls entered before the attach** (`record -p`: found on the thread's stack when
//!   recording started) begin at the attach, flagged, and pair with their exits as any
//!   entry does; they are the outermost calls of their thread's first events.

use dynprobe_events::model::{Event, EventKind};

/// Index of a node in [`CallTree::nodes`].
pub type NodeId = usize;

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// It returned at this time.
    Returned(u64),
    /// It was left without returning; the time is when the agent noticed.
    Unwound(u64),
    /// No exit was recorded: still running when the trace ended, or its exit was lost.
    Missing,
}

/// One call of a traced function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The function id (index into the process's functions).
    pub func: u32,
    /// The call depth the agent recorded.
    pub depth: u16,
    /// When it was entered; `None` when the entry was not recorded. For a call entered
    /// before the attach, the attach.
    pub begin: Option<u64>,
    /// How it ended.
    pub end: End,
    /// It was already running when recording started in a running process (`record -p`):
    /// `begin` is the attach, and its duration counts from there.
    pub before_attach: bool,
}

impl Call {
    /// When it ended, if its exit was recorded.
    pub fn end_ns(&self) -> Option<u64> {
        match self.end {
            End::Returned(ns) | End::Unwound(ns) => Some(ns),
            End::Missing => None,
        }
    }

    /// How long it ran, when both its entry and its exit were recorded.
    pub fn duration(&self) -> Option<u64> {
        Some(self.end_ns()?.saturating_sub(self.begin?))
    }
}

/// A node of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A call.
    Call(Call),
    /// `count` events were lost here.
    Lost {
        /// When the loss was recorded.
        ns: u64,
        /// How many events.
        count: u64,
        /// The depth the agent recorded with the loss.
        depth: u16,
    },
    /// A static marker was hit here (`record -M`).
    Marker {
        /// When.
        ns: u64,
        /// The marker site's id (index into the process's markers).
        site: u32,
        /// Its arguments' index in the thread's `marker_args`.
        args: u32,
        /// The depth a call made there would have had.
        depth: u16,
    },
}

/// A node and the nodes inside it, in time order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// What it is.
    pub item: Item,
    /// The calls (and losses) inside it.
    pub children: Vec<NodeId>,
}

/// One thread's calls.
#[derive(Debug, Clone, Default)]
pub struct CallTree {
    /// Every node; parents and children refer to each other by index.
    pub nodes: Vec<Node>,
    /// The outermost nodes, in time order.
    pub roots: Vec<NodeId>,
    /// The thread's first and last event times (the bounds given to calls whose entry
    /// or exit is unknown, where a time is needed).
    pub first_ns: u64,
    /// See `first_ns`.
    pub last_ns: u64,
}

/// A step of [`CallTree::walk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visit {
    /// Before the node's children; the depth counts from 0 at the roots.
    Enter(NodeId, usize),
    /// After the node's children.
    Leave(NodeId, usize),
}

impl CallTree {
    /// Pairs a thread's events (in time order) into its call tree.
    pub fn build(events: &[Event]) -> CallTree {
        let mut tree = CallTree {
            first_ns: events.first().map_or(0, |e| e.ns),
            last_ns: events.last().map_or(0, |e| e.ns),
            ..CallTree::default()
        };
        // The calls entered and not yet left, outermost first.
        let mut open: Vec<NodeId> = Vec::new();
        for event in events {
            match event.kind {
                EventKind::Entry | EventKind::EntryBeforeAttach => {
                    let before_attach = event.kind == EventKind::EntryBeforeAttach;
                    let call = Call {
                        func: event.func,
                        depth: event.depth,
                        begin: Some(event.ns),
                        end: End::Missing,
                        before_attach,
                    };
                    let id = tree.add(Item::Call(call), open.last().copied());
                    open.push(id);
                }
                EventKind::Exit | EventKind::Unwound => {
                    let end =
                        if event.kind == EventKind::Exit { End::Returned(event.ns) } else { End::Unwound(event.ns) };
                    let matching = open.iter().rposition(|&id| {
                        matches!(&tree.nodes[id].item, Item::Call(c) if c.func == event.func && c.depth == event.depth)
                    });
                    match matching {
                        Some(i) => {
                            if let Item::Call(call) = &mut tree.nodes[open[i]].item {
                                call.end = end;
                            }
                            // Any call above it lost its exit: it stays `Missing`.
                            open.truncate(i);
                        }
                        None => tree.add_unentered(event, end, open.last().copied()),
                    }
                }
                EventKind::Lost(count) => {
                    tree.add(Item::Lost { ns: event.ns, count, depth: event.depth }, open.last().copied());
                }
                EventKind::Marker(args) => {
                    let marker = Item::Marker { ns: event.ns, site: event.func, args, depth: event.depth };
                    tree.add(marker, open.last().copied());
                }
            }
        }
        tree
    }

    /// Adds `item` as the last child of `parent` (a root without one).
    fn add(&mut self, item: Item, parent: Option<NodeId>) -> NodeId {
        let id = self.nodes.len();
        self.nodes.push(Node { item, children: Vec::new() });
        self.siblings(parent).push(id);
        id
    }

    fn siblings(&mut self, parent: Option<NodeId>) -> &mut Vec<NodeId> {
        match parent {
            Some(parent) => &mut self.nodes[parent].children,
            None => &mut self.roots,
        }
    }

    /// Adds a call whose exit is `event` and whose entry was not recorded: the calls just
    /// before it that are deeper ran inside it (with the losses among them).
    fn add_unentered(&mut self, event: &Event, end: End, parent: Option<NodeId>) {
        let call = Call { func: event.func, depth: event.depth, begin: None, end, before_attach: false };
        let nodes = &self.nodes;
        let siblings = match parent {
            Some(parent) => &nodes[parent].children,
            None => &self.roots,
        };
        let inside = siblings
            .iter()
            .rev()
            .take_while(|&&id| match &nodes[id].item {
                Item::Call(Call { depth, .. }) | Item::Marker { depth, .. } => *depth > event.depth,
                Item::Lost { .. } => true,
            })
            .count();
        let keep = siblings.len() - inside;
        let children = self.siblings(parent).split_off(keep);
        let id = self.nodes.len();
        self.nodes.push(Node { item: Item::Call(call), children });
        self.siblings(parent).push(id);
    }

    /// The call at `id`, if it is one.
    pub fn call(&self, id: NodeId) -> Option<&Call> {
        match &self.nodes[id].item {
            Item::Call(call) => Some(call),
            Item::Lost { .. } | Item::Marker { .. } => None,
        }
    }

    /// Visits the nodes depth-first, in time order, without recursion (call trees can be
    /// as deep as the program's recursion). `Enter` returning false skips the node's
    /// children and its `Leave`.
    pub fn walk(&self, mut visit: impl FnMut(Visit) -> bool) {
        // (node, depth, next child to visit)
        let mut stack: Vec<(NodeId, usize, usize)> = Vec::new();
        for &root in &self.roots {
            if visit(Visit::Enter(root, 0)) {
                stack.push((root, 0, 0));
            }
            while let Some(top) = stack.last_mut() {
                let (id, depth, next) = *top;
                match self.nodes[id].children.get(next) {
                    Some(&child) => {
                        top.2 += 1;
                        if visit(Visit::Enter(child, depth + 1)) {
                            stack.push((child, depth + 1, 0));
                        }
                    }
                    None => {
                        stack.pop();
                        visit(Visit::Leave(id, depth));
                    }
                }
            }
        }
    }

    /// Each node's time span for the timelines (Chrome, flame graph), which need one for
    /// every call: an unknown beginning is the parent's (the thread's first event at the
    /// top), an unknown end the parent's (the thread's last event at the top); every span
    /// is clipped to its parent's, so the spans nest whatever the events said.
    pub fn spans(&self) -> Vec<(u64, u64)> {
        let mut spans = vec![(0, 0); self.nodes.len()];
        let mut parents: Vec<NodeId> = Vec::new();
        self.walk(|visit| {
            match visit {
                Visit::Enter(id, _) => {
                    let (low, high) = parents.last().map_or((self.first_ns, self.last_ns), |&p| spans[p]);
                    let (begin, end) = match &self.nodes[id].item {
                        Item::Call(call) => (call.begin.unwrap_or(low), call.end_ns().unwrap_or(high)),
                        Item::Lost { ns, .. } | Item::Marker { ns, .. } => (*ns, *ns),
                    };
                    let begin = begin.clamp(low, high);
                    spans[id] = (begin, end.clamp(begin, high));
                    parents.push(id);
                }
                Visit::Leave(..) => {
                    parents.pop();
                }
            }
            true
        });
        spans
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Events from `(ns, kind, depth, func)`.
    pub(crate) fn events(list: &[(u64, EventKind, u16, u32)]) -> Vec<Event> {
        list.iter().map(|&(ns, kind, depth, func)| Event { ns, kind, depth, func }).collect()
    }

    use EventKind::{Entry, EntryBeforeAttach, Exit, Lost, Marker, Unwound};

    #[test]
    fn marker_hits_sit_in_the_call_they_happened_in() {
        // f0 { m0 f1 { m1 } m0 }, then the exit of an unentered f2 that ran the last marker
        // (deeper than it) inside it.
        let tree = CallTree::build(&events(&[
            (1, Entry, 0, 0),
            (2, Marker(0), 1, 0),
            (3, Entry, 1, 1),
            (4, Marker(1), 2, 1),
            (5, Exit, 1, 1),
            (6, Marker(2), 1, 0),
            (7, Exit, 0, 0),
            (8, Marker(3), 1, 1),
            (9, Exit, 0, 2),
        ]));
        assert_eq!(shape(&tree), "0[m0.0 1[m1.1 ] m0.2 ] ?2[m1.3 ]");
        assert_eq!(tree.spans()[1], (2, 2));
    }

    /// The tree as `func[children]` text, with `?` for an unknown beginning and `…` for a
    /// missing end, `~` for unwound, `!n` for losses.
    fn shape(tree: &CallTree) -> String {
        let mut out = String::new();
        tree.walk(|visit| {
            match visit {
                Visit::Enter(id, _) => match &tree.nodes[id].item {
                    Item::Call(c) => {
                        out.push_str(if c.begin.is_none() { "?" } else { "" });
                        out.push_str(&c.func.to_string());
                        out.push_str(match c.end {
                            End::Missing => "…",
                            End::Unwound(_) => "~",
                            End::Returned(_) => "",
                        });
                        out.push('[');
                    }
                    Item::Lost { count, .. } => out.push_str(&format!("!{count}[")),
                    Item::Marker { site, args, .. } => out.push_str(&format!("m{site}.{args}[")),
                },
                Visit::Leave(..) => out.push_str("] "),
            }
            true
        });
        out.replace("[] ", " ").replace("[]", "").trim_end().to_string()
    }

    #[test]
    fn nested_and_recursive_calls_pair_by_depth() {
        let tree = CallTree::build(&events(&[
            (0, Entry, 0, 1),
            (1, Entry, 1, 2),
            (2, Entry, 2, 2),
            (3, Exit, 2, 2),
            (4, Exit, 1, 2),
            (5, Entry, 1, 3),
            (6, Exit, 1, 3),
            (7, Exit, 0, 1),
        ]));
        assert_eq!(shape(&tree), "1[2[2 ] 3 ]");
        let outer = tree.call(tree.nodes[tree.roots[0]].children[0]).unwrap();
        assert_eq!((outer.begin, outer.end, outer.duration()), (Some(1), End::Returned(4), Some(3)));
    }

    #[test]
    fn exits_without_entries_adopt_the_deeper_calls_before_them() {
        // A forked child: it returns out of 2 (depth 1) and then out of 1 (depth 0),
        // calling 3 between.
        let tree = CallTree::build(&events(&[
            (10, Entry, 2, 4),
            (11, Exit, 2, 4),
            (12, Exit, 1, 2),
            (13, Entry, 1, 3),
            (14, Exit, 1, 3),
            (15, Exit, 0, 1),
        ]));
        assert_eq!(shape(&tree), "?1[?2[4 ] 3 ]");
        assert_eq!(tree.call(tree.roots[0]).unwrap().duration(), None);
    }

    #[test]
    fn calls_entered_before_the_attach_begin_there_and_pair_with_their_exits() {
        let tree = CallTree::build(&events(&[
            (5, EntryBeforeAttach, 0, 1),
            (5, EntryBeforeAttach, 1, 2),
            (7, Unwound, 1, 2),
            (8, Entry, 1, 3),
            (9, Exit, 1, 3),
            (12, Exit, 0, 1),
        ]));
        assert_eq!(shape(&tree), "1[2~ 3 ]");
        let outer = tree.call(tree.roots[0]).unwrap();
        assert_eq!((outer.begin, outer.duration(), outer.before_attach), (Some(5), Some(7), true));
        let inner = tree.call(tree.nodes[tree.roots[0]].children[1]).unwrap();
        assert!(!inner.before_attach);
    }

    #[test]
    fn unwound_open_and_lost() {
        let tree = CallTree::build(&events(&[
            (0, Entry, 0, 1),
            (1, Entry, 1, 2),
            (2, Entry, 2, 3),
            (3, Unwound, 2, 3),
            (3, Unwound, 1, 2),
            (4, Lost(7), 1, 0),
            (5, Entry, 1, 4),
            (6, Entry, 2, 5),
            // 5's exit was lost: 4's exit closes 4 and leaves 5 without an end.
            (8, Exit, 1, 4),
            (9, Entry, 1, 6),
        ]));
        assert_eq!(shape(&tree), "1…[2~[3~ ] !7 4[5… ] 6… ]");
    }

    #[test]
    fn spans_nest_and_fill_the_unknown_ends() {
        let tree = CallTree::build(&events(&[
            (10, Entry, 1, 2),
            (12, Exit, 1, 2),
            (13, Exit, 0, 1),
            (20, Entry, 0, 3),
            (25, Entry, 1, 4),
            (30, Entry, 2, 5),
            (31, Exit, 2, 5),
        ]));
        assert_eq!(shape(&tree), "?1[2 ] 3…[4…[5 ] ]");
        let spans = tree.spans();
        let by_func: Vec<(u32, (u64, u64))> =
            (0..tree.nodes.len()).map(|id| (tree.call(id).unwrap().func, spans[id])).collect();
        assert_eq!(by_func, vec![(2, (10, 12)), (1, (10, 13)), (3, (20, 31)), (4, (25, 31)), (5, (30, 31))]);
    }

    #[test]
    fn walk_can_skip_subtrees() {
        let tree = CallTree::build(&events(&[(0, Entry, 0, 1), (1, Entry, 1, 2), (2, Exit, 1, 2), (3, Exit, 0, 1)]));
        let mut seen = Vec::new();
        tree.walk(|visit| {
            seen.push(visit);
            false
        });
        assert_eq!(seen, vec![Visit::Enter(0, 0)]);
    }
}
