use std::fs;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use phoenixfs_builder::oci::{self, OciSource};
use phoenixfs_builder::{build, build_from_tar, BuildOptions, Built};
use phoenixfs_format::chunk::{MAX_CHUNK_BITS, MIN_CHUNK_BITS};
use phoenixfs_store::StoreUrl;

use crate::args;

/// Where `build` and `convert` put what they make, and how they cut and compress it.
#[derive(clap::Args)]
pub struct OutputArgs {
    /// The chunk store: a local directory (created when missing) or a store URL
    /// (s3://BUCKET/PREFIX, oci://HOST/REPO).
    #[arg(long, value_parser = args::parse_store)]
    store: StoreUrl,
    /// Where to write the image file.
    #[arg(short = 'o', long = "output")]
    output: PathBuf,
    /// Chunk size: a power of two from 4K to 64M (suffixes K, M; bytes without one).
    #[arg(long, default_value = "1M", value_parser = parse_chunk_size)]
    chunk_size: u8,
    /// zstd compression level for chunks.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=19))]
    zstd_level: i32,
}

impl OutputArgs {
    fn options(&self) -> BuildOptions {
        BuildOptions { chunk_bits: self.chunk_size, zstd_level: self.zstd_level, progress: std::io::stderr().is_terminal() }
    }
}

pub fn run(src: &Path, out: &OutputArgs) -> Result<ExitCode> {
    let store = args::create_store(&out.store)?;
    let options = out.options();
    let built = if src == Path::new("-") {
        build_from_tar(std::io::stdin(), "on stdin", store.as_ref(), &options)?
    } else if src.is_dir() {
        build(src, store.as_ref(), &options)?
    } else {
        let file = fs::File::open(src).with_context(|| format!("cannot read {}", src.display()))?;
        build_from_tar(file, &src.display().to_string(), store.as_ref(), &options)?
    };
    report(&built, &out.output)
}

/// `phoenixfs convert`: a container image from a registry or a layout directory.
pub fn convert(source: &str, out: &OutputArgs) -> Result<ExitCode> {
    let source = OciSource::parse(source).map_err(anyhow::Error::msg)?;
    let store = args::create_store(&out.store)?;
    let converted = oci::convert(&source, store.as_ref(), &out.options())?;
    eprintln!("converted {source}: manifest {}, {} layers", converted.manifest_digest, converted.layers);
    report(&converted.built, &out.output)
}

/// Writes the image file, prints its id on stdout and what it holds on stderr.
fn report(built: &Built, output: &Path) -> Result<ExitCode> {
    write_atomically(output, &built.image_file)?;
    let s = &built.stats;
    println!("{}", built.id);
    eprintln!(
        "built {}: {} inodes ({} files, {} directories), {} bytes, {} chunks ({} new, {} bytes stored)",
        output.display(),
        s.inodes,
        s.regular_files,
        s.directories,
        s.logical_bytes,
        s.chunks,
        s.new_chunks,
        s.new_stored_bytes
    );
    Ok(ExitCode::SUCCESS)
}

/// Writes to a temporary file beside `path` and renames it, so `path` is complete or absent.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("cannot write {}", path.display()))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(path).with_context(|| format!("writing {}", path.display()))?;
    let _ = fs::File::open(dir).and_then(|d| d.sync_all());
    Ok(())
}

/// A byte count with an optional binary suffix: K, M, G, T (KiB, MiB, ... spelled out too).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let lower = text.trim().to_ascii_lowercase();
    let trimmed = lower.trim_end_matches("ib").trim_end_matches('b');
    let (digits, shift) = match trimmed.chars().last() {
        Some('k') => (&trimmed[..trimmed.len() - 1], 10),
        Some('m') => (&trimmed[..trimmed.len() - 1], 20),
        Some('g') => (&trimmed[..trimmed.len() - 1], 30),
        Some('t') => (&trimmed[..trimmed.len() - 1], 40),
        _ => (trimmed, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{text:?} is not a size"))
}

pub fn parse_chunk_size(text: &str) -> Result<u8, String> {
    let bytes = parse_size(text)?;
    let bits = bytes.trailing_zeros() as u8;
    if !bytes.is_power_of_two() || !(MIN_CHUNK_BITS..=MAX_CHUNK_BITS).contains(&bits) {
        return Err(format!("chunk size {text} must be a power of two from 4K to 64M"));
    }
    Ok(bits)
}

#[cfg(test)]
mod tests {
    use super::{parse_chunk_size, parse_size};

    #[test]
    fn chunk_sizes_parse() {
        assert_eq!(parse_chunk_size("1M"), Ok(20));
        assert_eq!(parse_chunk_size("4k"), Ok(12));
        assert_eq!(parse_chunk_size("64MiB"), Ok(26));
        assert_eq!(parse_chunk_size("65536"), Ok(16));
        assert!(parse_chunk_size("3M").is_err());
        assert!(parse_chunk_size("2K").is_err());
        assert!(parse_chunk_size("128M").is_err());
        assert!(parse_chunk_size("lots").is_err());
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
    }
}
