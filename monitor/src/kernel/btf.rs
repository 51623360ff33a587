//! A deliberately small reader for the kernel's BTF (`Documentation/bpf/btf.rst`).
//!
//! rustc emits no CO-RE relocations for BPF programs written in Rust, so the
//! daemon has to learn kernel struct layouts itself at load time and hand the
//! offsets to its programs. aya 0.14's `Btf` does not expose struct members,
//! hence this reader. It only answers the three questions the daemon asks, but
//! it walks every kind so that type ids stay aligned with the kernel's.

use std::ops::Range;
use std::path::{Path, PathBuf};

const MAGIC: u16 = 0xeb9f;
const VERSION: u8 = 1;
const MIN_HEADER_LEN: usize = 24;
const TYPE_HEADER_LEN: usize = 12;
/// Real kernels nest typedefs and anonymous members only a few levels deep;
/// the bound exists so corrupt or crafted input cannot loop or blow the stack.
const MAX_DEPTH: u32 = 64;
/// Crafted BTF can nest a struct in itself through several anonymous members,
/// which would make the search exponential; real lookups visit a few dozen.
const MAX_ANON_VISITS: u32 = 4096;

const INT: u32 = 1;
const PTR: u32 = 2;
const ARRAY: u32 = 3;
const STRUCT: u32 = 4;
const UNION: u32 = 5;
const ENUM: u32 = 6;
const FWD: u32 = 7;
const TYPEDEF: u32 = 8;
const VOLATILE: u32 = 9;
const CONST: u32 = 10;
const RESTRICT: u32 = 11;
const FUNC: u32 = 12;
const FUNC_PROTO: u32 = 13;
const VAR: u32 = 14;
const DATASEC: u32 = 15;
const FLOAT: u32 = 16;
const DECL_TAG: u32 = 17;
const TYPE_TAG: u32 = 18;
const ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read kernel BTF from {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(String),
    #[error("kernel BTF has no {kind} named `{name}`")]
    NoSuchType { kind: &'static str, name: String },
    #[error("kernel BTF has no member `{path}` in {ty}")]
    NoSuchMember { ty: String, path: String },
    #[error("member `{path}` of {ty} is a bitfield; BPF programs can only read it as whole bytes")]
    Bitfield { ty: String, path: String },
    #[error("member `{at}` of {ty} is not a struct or union, so `{path}` cannot be followed")]
    NotComposite {
        ty: String,
        path: String,
        at: String,
    },
    #[error("member `{path}` of {ty} has no known size")]
    Unsized { ty: String, path: String },
    #[error("kernel BTF has no enumerator `{name}` in enum {ty}")]
    NoSuchEnumerator { ty: String, name: String },
}

fn malformed(msg: impl Into<String>) -> BtfError {
    BtfError::Malformed(msg.into())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// Bytes from the start of the outer struct named in the lookup.
    pub offset: u32,
    /// Bytes; arrays count every element and pointers are 8, so this is how
    /// much a BPF program has to read.
    pub size: u32,
}

#[derive(Debug, Clone, Copy)]
struct Type {
    name_off: u32,
    info: u32,
    size_or_type: u32,
    /// Absolute offset of the kind-specific data following the type header.
    data: usize,
}

impl Type {
    const VOID: Type = Type {
        name_off: 0,
        info: 0,
        size_or_type: 0,
        data: 0,
    };
    fn kind(&self) -> u32 {
        (self.info >> 24) & 0x1f
    }
    fn vlen(&self) -> usize {
        (self.info & 0xffff) as usize
    }
    fn kind_flag(&self) -> bool {
        self.info >> 31 == 1
    }
}

/// A struct/union member as the lookup needs it.
struct Found {
    bit_offset: u64,
    ty: u32,
    bitfield: bool,
}

/// Keeps the raw blob and decodes members only when asked: the daemon asks a
/// few dozen questions, so decoding ~100k types' members up front would be waste.
pub struct KernelBtf {
    bytes: Vec<u8>,
    strings: Range<usize>,
    /// Indexed by type id; slot 0 is void.
    types: Vec<Type>,
    /// (hash of name, type id), sorted. A `HashMap<Box<[u8]>, Vec<u32>>`
    /// meant ~100k allocations, which took ~30 of ~35 ms parsing vmlinux;
    /// names are compared on lookup, so hash collisions are harmless. Names
    /// repeat across kinds and within a kind, so every id is kept.
    by_name: Vec<(u64, u32)>,
}

fn u32_at(bytes: &[u8], off: usize) -> Option<u32> {
    let word = bytes.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(word.try_into().ok()?))
}

impl KernelBtf {
    pub const VMLINUX: &'static str = "/sys/kernel/btf/vmlinux";

    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new(Self::VMLINUX))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let bytes = std::fs::read(path).map_err(|source| BtfError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(bytes)
    }

    /// Validates the layout up front so that later lookups only fail on
    /// dangling references inside otherwise well-formed sections.
    pub fn parse(bytes: Vec<u8>) -> Result<Self, BtfError> {
        let magic = bytes
            .get(0..2)
            .and_then(|b| b.try_into().ok())
            .map(u16::from_le_bytes)
            .ok_or_else(|| malformed("blob too short for the BTF magic"))?;
        if magic == MAGIC.swap_bytes() {
            return Err(malformed(
                "BTF is big-endian; only little-endian is supported",
            ));
        }
        if magic != MAGIC {
            return Err(malformed(format!(
                "bad magic {magic:#06x}, expected {MAGIC:#06x}"
            )));
        }
        if bytes.len() < MIN_HEADER_LEN {
            return Err(malformed(format!(
                "blob of {} bytes is too short for the {MIN_HEADER_LEN}-byte header",
                bytes.len()
            )));
        }
        let version = bytes.get(2).copied().unwrap_or_default();
        if version != VERSION {
            return Err(malformed(format!("unsupported BTF version {version}")));
        }
        let word = |i: usize| {
            u32_at(&bytes, 4 + 4 * i)
                .map(|w| w as usize)
                .ok_or_else(|| malformed("truncated header"))
        };
        let hdr_len = word(0)?;
        if hdr_len < MIN_HEADER_LEN || hdr_len > bytes.len() {
            return Err(malformed(format!(
                "header length {hdr_len} is out of range"
            )));
        }
        // Section offsets are relative to the end of the header.
        let section = |what: &str, off: usize, len: usize| {
            hdr_len
                .checked_add(off)
                .and_then(|start| Some(start..start.checked_add(len)?))
                .filter(|r| r.end <= bytes.len())
                .ok_or_else(|| {
                    malformed(format!(
                        "{what} section (offset {off}, length {len}) extends past the {}-byte blob",
                        bytes.len()
                    ))
                })
        };
        let type_sec = section("type", word(1)?, word(2)?)?;
        let strings = section("string", word(3)?, word(4)?)?;
        // A leading NUL makes offset 0 the empty name; a trailing NUL lets
        // every in-bounds offset end in a terminator without further checks.
        let str_bytes = bytes.get(strings.clone()).unwrap_or_default();
        if str_bytes.first() != Some(&0) || str_bytes.last() != Some(&0) {
            return Err(malformed("string section must start and end with NUL"));
        }

        let mut btf = KernelBtf {
            strings,
            types: vec![Type::VOID],
            by_name: Vec::new(),
            bytes: Vec::new(),
        };
        let mut pos = type_sec.start;
        while pos < type_sec.end {
            let id = btf.types.len();
            let header_end = pos + TYPE_HEADER_LEN;
            let word =
                |i: usize| u32_at(&bytes, pos + 4 * i).filter(|_| header_end <= type_sec.end);
            let (Some(name_off), Some(info), Some(size_or_type)) = (word(0), word(1), word(2))
            else {
                return Err(malformed(format!("type id {id} is truncated")));
            };
            let ty = Type {
                name_off,
                info,
                size_or_type,
                data: header_end,
            };
            let vlen = ty.vlen();
            let trailing = match ty.kind() {
                PTR | FWD | TYPEDEF | VOLATILE | CONST | RESTRICT | FUNC | FLOAT | TYPE_TAG => 0,
                INT | VAR | DECL_TAG => 4,
                ARRAY => 12,
                STRUCT | UNION | DATASEC | ENUM64 => 12 * vlen,
                ENUM | FUNC_PROTO => 8 * vlen,
                kind => return Err(malformed(format!("type id {id} has unknown kind {kind}"))),
            };
            pos = header_end + trailing;
            if pos > type_sec.end {
                return Err(malformed(format!(
                    "type id {id} runs past the end of the type section"
                )));
            }
            let id = u32::try_from(id).map_err(|_| malformed("too many types"))?;
            let name = btf_name(&bytes, &btf.strings, name_off).ok_or_else(|| {
                malformed(format!(
                    "type id {id} has name offset {name_off} outside the string section"
                ))
            })?;
            if !name.is_empty() {
                btf.by_name.push((name_hash(name), id));
            }
            btf.types.push(ty);
        }
        // Sorting whole tuples keeps same-name ids in id order, which `pick`
        // relies on to be deterministic.
        btf.by_name.sort_unstable();
        btf.bytes = bytes;
        Ok(btf)
    }

    /// Offset and size of a member reached by a dotted path from a named struct (or union).
    ///
    /// Each component is also searched inside anonymous struct/union members,
    /// because the kernel hides fields such as `sock_common.skc_daddr` in them.
    /// Modifier and typedef chains are followed since kernel members are often
    /// typedef'd or `const`. Bitfields are refused: their offset is not a byte
    /// offset, and BPF code reads members as plain bytes.
    pub fn member(&self, struct_name: &str, path: &str) -> Result<Member, BtfError> {
        let root =
            self.pick(struct_name, &[STRUCT, UNION])
                .ok_or_else(|| BtfError::NoSuchType {
                    kind: "struct or union",
                    name: struct_name.to_owned(),
                })?;
        let kind_word = if self.ty(root)?.kind() == UNION {
            "union"
        } else {
            "struct"
        };
        let ty_desc = format!("{kind_word} {struct_name}");
        let prefix = |end: usize| path.split('.').take(end).collect::<Vec<_>>().join(".");

        let mut current = root;
        let mut offset_bits = 0u64;
        for (i, component) in path.split('.').enumerate() {
            if i > 0 {
                let resolved = self.resolve(current)?;
                if !matches!(self.ty(resolved)?.kind(), STRUCT | UNION) {
                    return Err(BtfError::NotComposite {
                        ty: ty_desc,
                        path: path.to_owned(),
                        at: prefix(i),
                    });
                }
                current = resolved;
            }
            // An empty component would otherwise match an anonymous member.
            let found = if component.is_empty() {
                None
            } else {
                let mut budget = MAX_ANON_VISITS;
                self.find_member(current, component.as_bytes(), 0, &mut budget)?
            };
            let Some(found) = found else {
                return Err(BtfError::NoSuchMember {
                    ty: ty_desc,
                    path: path.to_owned(),
                });
            };
            if found.bitfield {
                return Err(BtfError::Bitfield {
                    ty: ty_desc,
                    path: prefix(i + 1),
                });
            }
            // Saturating: an absurd sum then fails the u32 conversion below.
            offset_bits = offset_bits.saturating_add(found.bit_offset);
            current = found.ty;
        }
        let size = self.size_of(current, 0)?.ok_or_else(|| BtfError::Unsized {
            ty: ty_desc.clone(),
            path: path.to_owned(),
        })?;
        let offset = u32::try_from(offset_bits / 8);
        match (offset, u32::try_from(size)) {
            (Ok(offset), Ok(size)) => Ok(Member { offset, size }),
            _ => Err(malformed(format!(
                "member `{path}` of {ty_desc} does not fit in u32"
            ))),
        }
    }

    /// Value of a named enumerator of a named enum (ENUM or ENUM64).
    ///
    /// Unsigned 64-bit values above `i64::MAX` come back as their two's
    /// complement bit pattern, which is what a BPF program comparing a u64
    /// field needs anyway. Kernels before 6.0 never set the signedness flag on
    /// ENUM, so a negative enumerator there reads as a large positive value.
    pub fn enumerator(&self, enum_name: &str, name: &str) -> Result<i64, BtfError> {
        let id = self
            .pick(enum_name, &[ENUM, ENUM64])
            .ok_or_else(|| BtfError::NoSuchType {
                kind: "enum",
                name: enum_name.to_owned(),
            })?;
        let ty = self.ty(id)?;
        let stride = if ty.kind() == ENUM64 { 12 } else { 8 };
        let truncated = || malformed(format!("enum {enum_name} is truncated"));
        for i in 0..ty.vlen() {
            let base = ty.data + i * stride;
            let name_off = u32_at(&self.bytes, base).ok_or_else(truncated)?;
            if self.name(name_off) != Some(name.as_bytes()) {
                continue;
            }
            let lo = u32_at(&self.bytes, base + 4).ok_or_else(truncated)?;
            return Ok(if ty.kind() == ENUM64 {
                let hi = u32_at(&self.bytes, base + 8).ok_or_else(truncated)?;
                ((u64::from(hi) << 32) | u64::from(lo)) as i64
            } else if ty.kind_flag() {
                i64::from(lo as i32)
            } else {
                i64::from(lo)
            });
        }
        Err(BtfError::NoSuchEnumerator {
            ty: enum_name.to_owned(),
            name: name.to_owned(),
        })
    }

    /// Whether a FUNC of that name exists, i.e. whether attaching to it is worth trying.
    pub fn has_function(&self, name: &str) -> bool {
        self.pick(name, &[FUNC]).is_some()
    }

    /// vmlinux carries same-named types of different kinds, and forward
    /// declarations next to definitions; the definition is what callers mean.
    /// Type ids and sizes of every complete struct called `name` (more than
    /// one means the BTF kept differing definitions).
    pub fn structs_named(&self, name: &str) -> Vec<(u32, u32)> {
        let hash = name_hash(name.as_bytes());
        let start = self.by_name.partition_point(|&(h, _)| h < hash);
        self.by_name
            .get(start..)
            .unwrap_or_default()
            .iter()
            .take_while(|&&(h, _)| h == hash)
            .filter_map(|&(_, id)| {
                let ty = self.types.get(id as usize)?;
                (ty.kind() == STRUCT
                    && ty.size_or_type > 0
                    && self.name(ty.name_off) == Some(name.as_bytes()))
                .then_some((id, ty.size_or_type))
            })
            .collect()
    }

    fn pick(&self, name: &str, kinds: &[u32]) -> Option<u32> {
        let hash = name_hash(name.as_bytes());
        let start = self.by_name.partition_point(|&(h, _)| h < hash);
        let same_hash = self.by_name.get(start..).unwrap_or_default();
        let mut fallback = None;
        for &(_, id) in same_hash.iter().take_while(|&&(h, _)| h == hash) {
            let Some(ty) = self.types.get(id as usize) else {
                continue;
            };
            if !kinds.contains(&ty.kind()) || self.name(ty.name_off) != Some(name.as_bytes()) {
                continue;
            }
            let complete = match ty.kind() {
                STRUCT | UNION => ty.size_or_type > 0,
                ENUM | ENUM64 => ty.vlen() > 0,
                _ => true,
            };
            if complete {
                return Some(id);
            }
            fallback.get_or_insert(id);
        }
        fallback
    }

    fn ty(&self, id: u32) -> Result<&Type, BtfError> {
        self.types.get(id as usize).ok_or_else(|| {
            malformed(format!(
                "reference to type id {id}, but only {} types exist",
                self.types.len()
            ))
        })
    }

    fn name(&self, off: u32) -> Option<&[u8]> {
        btf_name(&self.bytes, &self.strings, off)
    }

    /// Strips typedefs and qualifiers, which carry no layout of their own.
    fn resolve(&self, mut id: u32) -> Result<u32, BtfError> {
        for _ in 0..MAX_DEPTH {
            let ty = self.ty(id)?;
            match ty.kind() {
                TYPEDEF | VOLATILE | CONST | RESTRICT | TYPE_TAG => id = ty.size_or_type,
                _ => return Ok(id),
            }
        }
        Err(malformed(format!(
            "typedef/modifier chain at type id {id} is cyclic or too long"
        )))
    }

    /// `None` for types that have no size a member could occupy (void, FWD, FUNC, ...).
    fn size_of(&self, id: u32, depth: u32) -> Result<Option<u64>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(malformed(format!(
                "array nesting at type id {id} is too deep"
            )));
        }
        let ty = self.ty(self.resolve(id)?)?;
        Ok(match ty.kind() {
            INT | STRUCT | UNION | ENUM | ENUM64 | FLOAT => Some(u64::from(ty.size_or_type)),
            // vmlinux BTF only exists for 64-bit targets that idlemon supports.
            PTR => Some(8),
            ARRAY => {
                let bad = || malformed(format!("array type id {id} is truncated"));
                let elem = u32_at(&self.bytes, ty.data).ok_or_else(bad)?;
                let nelems = u32_at(&self.bytes, ty.data + 8).ok_or_else(bad)?;
                match self.size_of(elem, depth + 1)? {
                    Some(size) => {
                        Some(size.checked_mul(u64::from(nelems)).ok_or_else(|| {
                            malformed(format!("array type id {id} size overflows"))
                        })?)
                    }
                    None => None,
                }
            }
            _ => None,
        })
    }

    /// Direct members win over ones found inside anonymous members, matching C
    /// name lookup (C forbids the same name at both levels anyway).
    fn find_member(
        &self,
        composite: u32,
        name: &[u8],
        depth: u32,
        budget: &mut u32,
    ) -> Result<Option<Found>, BtfError> {
        *budget = budget.saturating_sub(1);
        if depth > MAX_DEPTH || *budget == 0 {
            return Err(malformed(format!(
                "anonymous members nested too deep or too often at type id {composite}"
            )));
        }
        let ty = *self.ty(composite)?;
        let member = |i: usize| {
            let base = ty.data + i * 12;
            let word = |k: usize| u32_at(&self.bytes, base + 4 * k);
            match (word(0), word(1), word(2)) {
                (Some(name_off), Some(ty_id), Some(raw)) => Ok((name_off, ty_id, raw)),
                _ => Err(malformed(format!(
                    "members of type id {composite} are truncated"
                ))),
            }
        };
        // With kind_flag the offset word packs the bitfield size in its top byte.
        let split = |raw: u32| {
            if ty.kind_flag() {
                (u64::from(raw & 0x00ff_ffff), raw >> 24)
            } else {
                (u64::from(raw), 0)
            }
        };
        for i in 0..ty.vlen() {
            let (name_off, ty_id, raw) = member(i)?;
            if self.name(name_off) != Some(name) {
                continue;
            }
            let (bit_offset, bitfield_size) = split(raw);
            let bitfield = bitfield_size != 0
                || bit_offset % 8 != 0
                || (!ty.kind_flag() && self.is_int_bitfield(ty_id)?);
            return Ok(Some(Found {
                bit_offset,
                ty: ty_id,
                bitfield,
            }));
        }
        for i in 0..ty.vlen() {
            let (name_off, ty_id, raw) = member(i)?;
            if !self.name(name_off).is_some_and(<[u8]>::is_empty) {
                continue;
            }
            let inner = self.resolve(ty_id)?;
            if !matches!(self.ty(inner)?.kind(), STRUCT | UNION) {
                continue;
            }
            if let Some(mut found) = self.find_member(inner, name, depth + 1, budget)? {
                found.bit_offset += split(raw).0;
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// Without kind_flag, older BTF encodes bitfields in the INT type itself
    /// (a bit offset, or fewer bits than the storage size).
    fn is_int_bitfield(&self, id: u32) -> Result<bool, BtfError> {
        let ty = self.ty(self.resolve(id)?)?;
        if ty.kind() != INT {
            return Ok(false);
        }
        let encoding = u32_at(&self.bytes, ty.data)
            .ok_or_else(|| malformed(format!("int type id {id} is truncated")))?;
        let bits = encoding & 0xff;
        let bit_offset = (encoding >> 16) & 0xff;
        Ok(bit_offset != 0 || u64::from(bits) != u64::from(ty.size_or_type) * 8)
    }
}

/// FNV-1a: a few lines, no allocation, and good enough spread for identifiers.
fn name_hash(name: &[u8]) -> u64 {
    name.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Free function so `parse` can use it before `KernelBtf` owns the bytes.
fn btf_name<'a>(bytes: &'a [u8], strings: &Range<usize>, off: u32) -> Option<&'a [u8]> {
    let rest = bytes.get(strings.clone())?.get(off as usize..)?;
    let len = rest.iter().position(|&b| b == 0)?;
    rest.get(..len)
}

/// Hand-assembled BTF, for this reader's tests and the layout's.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Or'ed into a kind to set the type's kind_flag.
    pub(crate) const KF: u32 = 0x100;

    /// Assembles BTF blobs by hand; ids are handed out in insertion order from 1.
    pub(crate) struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        pub(crate) next_id: u32,
    }

    impl Default for Builder {
        fn default() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
            }
        }
    }

    impl Builder {
        fn str(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            (self.strings.len() - s.len() - 1) as u32
        }
        pub(crate) fn ty(
            &mut self,
            name: &str,
            kind: u32,
            vlen: u32,
            size_or_type: u32,
            tail: &[u32],
        ) -> u32 {
            let info = (u32::from(kind & KF != 0) << 31) | ((kind & 0x1f) << 24) | vlen;
            let name = self.str(name);
            for w in [name, info, size_or_type].iter().chain(tail) {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
            self.next_id += 1;
            self.next_id - 1
        }
        /// Members are (name, type, raw offset word).
        pub(crate) fn comp(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let mut tail = Vec::new();
            for &(name, ty, off) in members {
                tail.extend([self.str(name), ty, off]);
            }
            self.ty(name, kind, members.len() as u32, size, &tail)
        }
        /// An unsigned integer of `size` bytes.
        pub(crate) fn int(&mut self, name: &str, size: u32) -> u32 {
            self.ty(name, INT, 0, size, &[size * 8])
        }
        /// Members are (name, type, byte offset).
        pub(crate) fn structure(
            &mut self,
            name: &str,
            size: u32,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            self.plain(STRUCT, name, size, members)
        }
        /// Members are (name, type, byte offset).
        pub(crate) fn union(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
            self.plain(UNION, name, size, members)
        }
        fn plain(&mut self, kind: u32, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
            let in_bits: Vec<_> = members
                .iter()
                .map(|&(name, ty, offset)| (name, ty, offset * 8))
                .collect();
            self.comp(kind, name, size, &in_bits)
        }
        pub(crate) fn enumer(&mut self, kind: u32, name: &str, values: &[(&str, u64)]) -> u32 {
            let mut tail = Vec::new();
            for &(name, v) in values {
                tail.extend([self.str(name), v as u32]);
                if kind & 0x1f == ENUM64 {
                    tail.push((v >> 32) as u32);
                }
            }
            let size = if kind & 0x1f == ENUM64 { 8 } else { 4 };
            self.ty(name, kind, values.len() as u32, size, &tail)
        }
        pub(crate) fn build(&self) -> Vec<u8> {
            let tlen = self.types.len() as u32;
            let mut out = vec![0x9f, 0xeb, VERSION, 0];
            for w in [24, 0, tlen, tlen, self.strings.len() as u32] {
                out.extend_from_slice(&w.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::testing::{Builder, KF};
    use super::*;

    fn sample() -> Vec<u8> {
        let mut b = Builder::default();
        // Kinds that lookups never touch come first, so a mis-sized walk
        // would shift every later id and break the tests below.
        let u8_ = b.ty("u8", INT, 0, 1, &[8]);
        let u16_ = b.ty("u16", INT, 0, 2, &[16]);
        let u32_ = b.ty("u32", INT, 0, 4, &[32]);
        let u64_ = b.ty("u64", INT, 0, 8, &[64]);
        b.ty("double", FLOAT, 0, 8, &[]);
        let proto = b.ty("", FUNC_PROTO, 2, u32_, &[0, u32_, 0, u64_]);
        let var = b.ty("some_var", VAR, 0, u32_, &[1]);
        b.ty(".data", DATASEC, 1, 4, &[var, 0, 4]);
        b.ty("tag", DECL_TAG, 0, var, &[u32::MAX]);
        let tagged = b.ty("user", TYPE_TAG, 0, u32_, &[]);
        let vol = b.ty("", VOLATILE, 0, tagged, &[]);
        let qual = b.ty("", RESTRICT, 0, vol, &[]);
        b.ty("tcp_sendmsg", FUNC, 1, proto, &[]);
        // Decoys: same name, but the wrong kind or incomplete.
        b.ty("sock_common", FUNC, 0, proto, &[]);
        b.ty("sock_common", FWD, 0, 0, &[]);
        b.comp(STRUCT, "sock_common", 0, &[]);
        b.enumer(ENUM, "sock_flags", &[]);

        let un = b.comp(
            UNION,
            "",
            8,
            &[("skc_addrpair", u64_, 0), ("skc_daddr", u32_, 0)],
        );
        let anon = b.comp(STRUCT, "", 12, &[("pad", u32_, 0), ("", un, 32)]);
        let arr3 = b.ty("", ARRAY, 0, 0, &[u8_, u32_, 3]);
        let arr4 = b.ty("", ARRAY, 0, 0, &[u32_, u32_, 4]);
        let arr2x4 = b.ty("", ARRAY, 0, 0, &[arr4, u32_, 2]);
        let ptr = b.ty("", PTR, 0, un, &[]);
        let members = [
            ("skc_state", u8_, 0),
            ("", anon, 32),
            ("skc_pad", arr3, 128),
            ("skc_v6", arr4, 160),
            ("skc_grid", arr2x4, 288),
            ("skc_ptr", ptr, 320),
            ("skc_qual", qual, 384),
        ];
        b.comp(STRUCT, "sock_common", 64, &members);

        // a.b.c through a typedef'd, const-qualified struct member.
        let c_t = b.comp(STRUCT, "c_t", 8, &[("pad", arr3, 0), ("c", u16_, 32)]);
        let c_td = b.ty("C", TYPEDEF, 0, c_t, &[]);
        let c_const = b.ty("", CONST, 0, c_td, &[]);
        let b_s = b.comp(STRUCT, "b_s", 16, &[("z", u64_, 0), ("b", c_const, 64)]);
        let cyc = b.ty("cyc_a", TYPEDEF, 0, b.next_id + 1, &[]);
        b.ty("cyc_b", TYPEDEF, 0, cyc, &[]);
        b.comp(
            STRUCT,
            "outer",
            32,
            &[("q", u32_, 0), ("a", b_s, 64), ("loop", cyc, 192)],
        );

        // With kind_flag the top byte of the offset is the bitfield size;
        // without it, old-style bitfields live in the INT encoding.
        b.comp(
            STRUCT | KF,
            "bits",
            8,
            &[("flags", u32_, 3 << 24), ("whole", u32_, 32)],
        );
        let nib = b.ty("nibble", INT, 0, 1, &[4]);
        let members = [("odd", u8_, 4), ("nib", nib, 8), ("ok", u16_, 16)];
        b.comp(STRUCT, "oldbits", 4, &members);
        let boom = b.next_id;
        b.comp(
            STRUCT,
            "boom",
            8,
            &[("", boom, 0), ("", boom, 0), ("", boom, 0)],
        );

        let flags = [
            ("SOCK_DEAD", 0),
            ("SOCK_DONE", 1),
            ("SOCK_URGINLINE", 2),
            ("SOCK_KEEPOPEN", 3),
        ];
        b.enumer(ENUM, "sock_flags", &flags);
        b.enumer(ENUM | KF, "signed_e", &[("MINUS_ONE", u64::from(u32::MAX))]);
        b.enumer(
            ENUM64,
            "big_e",
            &[("BIG", 0x1_89ab_cdef), ("HUGE", u64::MAX)],
        );
        b.build()
    }

    fn btf() -> KernelBtf {
        KernelBtf::parse(sample()).unwrap()
    }

    fn at(struct_name: &str, path: &str) -> (u32, u32) {
        let m = btf().member(struct_name, path).unwrap();
        (m.offset, m.size)
    }

    fn err(struct_name: &str, path: &str) -> BtfError {
        btf().member(struct_name, path).unwrap_err()
    }

    #[test]
    fn plain_and_anonymous_members() {
        assert_eq!(at("sock_common", "skc_state"), (0, 1));
        // Inside an anonymous union inside an anonymous struct: 4 + 4.
        assert_eq!(at("sock_common", "skc_daddr"), (8, 4));
        assert_eq!(at("sock_common", "skc_addrpair"), (8, 8));
        assert_eq!(at("sock_common", "skc_ptr"), (40, 8));
        assert_eq!(at("sock_common", "skc_qual"), (48, 4));
    }

    #[test]
    fn nested_path_through_typedef() {
        assert_eq!(at("outer", "a.b.c"), (20, 2));
        assert_eq!(at("outer", "a.b"), (16, 8));
        let e = err("outer", "q.x");
        assert!(
            matches!(e, BtfError::NotComposite { ref at, .. } if at == "q"),
            "{e}"
        );
    }

    #[test]
    fn array_sizes() {
        assert_eq!(at("sock_common", "skc_pad"), (16, 3));
        assert_eq!(at("sock_common", "skc_v6"), (20, 16));
        assert_eq!(at("sock_common", "skc_grid"), (36, 32));
    }

    #[test]
    fn bitfields_are_rejected() {
        for (s, path) in [("bits", "flags"), ("oldbits", "odd"), ("oldbits", "nib")] {
            let e = err(s, path);
            assert!(matches!(e, BtfError::Bitfield { .. }), "{s}.{path}: {e}");
            assert!(e.to_string().contains(path), "{e}");
        }
        assert_eq!(at("bits", "whole"), (4, 4));
        assert_eq!(at("oldbits", "ok"), (2, 2));
    }

    #[test]
    fn unknown_names_are_named_in_errors() {
        let e = err("outer", "a.b.nope");
        assert!(matches!(e, BtfError::NoSuchMember { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "kernel BTF has no member `a.b.nope` in struct outer"
        );
        for path in ["", "a..c", "a."] {
            assert!(
                matches!(err("outer", path), BtfError::NoSuchMember { .. }),
                "{path:?}"
            );
        }
        let e = err("no_such_struct", "x");
        assert!(matches!(e, BtfError::NoSuchType { .. }), "{e}");
        assert!(e.to_string().contains("`no_such_struct`"), "{e}");
        let e = btf()
            .enumerator("sock_flags", "SOCK_NOPE")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "kernel BTF has no enumerator `SOCK_NOPE` in enum sock_flags"
        );
    }

    #[test]
    fn cycles_are_errors() {
        assert!(matches!(err("outer", "loop"), BtfError::Malformed(_)));
        assert!(matches!(err("outer", "loop.x"), BtfError::Malformed(_)));
        // 3^64 paths without the visit budget.
        assert!(matches!(err("boom", "x"), BtfError::Malformed(_)));
    }

    #[test]
    fn enumerators() {
        let btf = btf();
        assert_eq!(btf.enumerator("sock_flags", "SOCK_KEEPOPEN").unwrap(), 3);
        assert_eq!(btf.enumerator("signed_e", "MINUS_ONE").unwrap(), -1);
        assert_eq!(btf.enumerator("big_e", "BIG").unwrap(), 0x1_89ab_cdef);
        assert_eq!(btf.enumerator("big_e", "HUGE").unwrap(), -1);
        assert!(matches!(
            btf.enumerator("nope", "X"),
            Err(BtfError::NoSuchType { .. })
        ));
    }

    #[test]
    fn functions() {
        let btf = btf();
        assert!(btf.has_function("tcp_sendmsg"));
        assert!(btf.has_function("sock_common"));
        assert!(!btf.has_function("outer"));
        assert!(!btf.has_function("tcp_recvmsg"));
    }

    #[test]
    fn malformed_inputs_are_errors() {
        let good = sample();
        let patched = |at: usize, value: u32| {
            let mut blob = good.clone();
            blob[at..at + 4].copy_from_slice(&value.to_le_bytes());
            blob
        };
        let cases = [
            ("empty", Vec::new()),
            ("bad magic", patched(0, 0x0001_1234)),
            ("big-endian magic", patched(0, 0x0001_9feb)),
            ("truncated header", good[..10].to_vec()),
            ("type section out of bounds", patched(12, u32::MAX - 8)),
            ("string offset overflow", patched(16, u32::MAX)),
            ("string section cut short", good[..good.len() - 1].to_vec()),
            ("name offset out of bounds", patched(24, 1 << 20)),
            ("unknown kind", patched(28, 25 << 24)),
            ("members past the end", patched(28, (STRUCT << 24) | 0xffff)),
        ];
        for (what, blob) in cases {
            match KernelBtf::parse(blob) {
                Err(BtfError::Malformed(msg)) => eprintln!("{what}: {msg}"),
                Err(e) => panic!("{what}: unexpected {e}"),
                Ok(_) => panic!("{what}: parsed"),
            }
        }
    }

    /// Poor man's fuzzing: every truncation and many byte corruptions must
    /// come back as a result, never a panic.
    #[test]
    fn corrupted_inputs_never_panic() {
        let good = sample();
        let probe = |blob: &[u8]| {
            if let Ok(btf) = KernelBtf::parse(blob.to_vec()) {
                let _ = btf.member("sock_common", "skc_daddr");
                let _ = btf.member("sock_common", "skc_grid");
                let _ = btf.member("outer", "a.b.c");
                let _ = btf.enumerator("big_e", "HUGE");
                let _ = btf.enumerator("sock_flags", "SOCK_KEEPOPEN");
                let _ = btf.has_function("tcp_sendmsg");
            }
        };
        for len in 0..good.len() {
            probe(&good[..len]);
        }
        for i in 0..good.len() {
            for v in [0u8, 1, 3, 0x7f, 0x80, 0xff] {
                let mut blob = good.clone();
                blob[i] = v;
                probe(&blob);
            }
        }
    }

    #[test]
    fn real_vmlinux() {
        let Ok(bytes) = std::fs::read(KernelBtf::VMLINUX) else {
            eprintln!("skipping: cannot read {}", KernelBtf::VMLINUX);
            return;
        };
        let start = std::time::Instant::now();
        let btf = KernelBtf::parse(bytes).unwrap();
        eprintln!("parsed {} types in {:?}", btf.types.len(), start.elapsed());
        let expect: &[(&str, &str, Option<u32>)] = &[
            ("tcp_sock", "lsndtime", Some(4)),
            ("tcp_sock", "rcv_tstamp", Some(4)),
            ("tcp_sock", "keepalive_time", Some(4)),
            ("tcp_sock", "keepalive_intvl", Some(4)),
            ("tcp_sock", "keepalive_probes", Some(1)),
            ("tcp_sock", "inet_conn.icsk_ack.lrcvtime", Some(4)),
            ("tcp_sock", "inet_conn.icsk_probes_out", Some(1)),
            ("sock", "sk_timer", None),
            ("sock", "__sk_common.skc_state", Some(1)),
            ("sock", "__sk_common.skc_family", Some(2)),
            ("sock", "__sk_common.skc_num", Some(2)),
            ("sock", "__sk_common.skc_dport", Some(2)),
            ("sock", "__sk_common.skc_daddr", Some(4)),
            ("sock", "__sk_common.skc_rcv_saddr", Some(4)),
            ("sock", "__sk_common.skc_v6_daddr", Some(16)),
            ("sock", "__sk_common.skc_v6_rcv_saddr", Some(16)),
            ("sock", "__sk_common.skc_net", Some(8)),
            ("net", "ns.inum", Some(4)),
            ("net", "ipv4.sysctl_tcp_keepalive_time", Some(4)),
            ("net", "ipv4.sysctl_tcp_keepalive_intvl", Some(4)),
            ("net", "ipv4.sysctl_tcp_keepalive_probes", Some(1)),
        ];
        for &(s, path, size) in expect {
            let m = btf.member(s, path).unwrap_or_else(|e| panic!("{e}"));
            eprintln!("{s}.{path}: offset {} size {}", m.offset, m.size);
            if let Some(size) = size {
                assert_eq!(m.size, size, "{s}.{path}");
            }
        }
        // 6.18 has no sock.sk_flags in BTF; the flags word lives in
        // sock_common as skc_flags (in an anonymous union), so accept either.
        let flags = btf
            .member("sock", "sk_flags")
            .or_else(|_| btf.member("sock", "__sk_common.skc_flags"))
            .unwrap();
        eprintln!("sock sk_flags: {flags:?}");
        assert_eq!(flags.size, 8);
        assert_eq!(btf.enumerator("sock_flags", "SOCK_KEEPOPEN").unwrap(), 3);
        assert!(btf.has_function("tcp_sendmsg"));
        eprintln!(
            "{}",
            btf.member("tcp_sock", "inet_conn.icsk_ack.nope")
                .unwrap_err()
        );
    }
}
