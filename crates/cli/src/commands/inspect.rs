use std::process::ExitCode;

use anyhow::{Context, Result};
use phoenixfs_builder::oci::recorded_oci;
use phoenixfs_format::summary::summarize;
use phoenixfs_store::StoreUrl;

use crate::args;

pub fn run(image: &str, store: Option<&StoreUrl>, json: bool) -> Result<ExitCode> {
    let store = store.map(args::open_store).transpose()?;
    let file = args::load(image, store.as_deref())?;
    let s = summarize(&file).with_context(|| format!("image {image} is corrupt"))?;
    let oci = recorded_oci(&file);
    if json {
        let mut value = serde_json::json!({
            "id": file.id.to_string(),
            "paths": s.paths,
            "directories": s.directories,
            "regular_files": s.regular_files,
            "symlinks": s.symlinks,
            "special_files": s.special_files,
            "inline_files": s.inline_files,
            "logical_bytes": s.logical_bytes,
            "chunk_size": s.chunk_size,
            "chunks": s.chunks,
            "chunk_bytes": s.chunk_bytes,
            "stored_chunk_bytes": s.stored_chunk_bytes,
            "chunk_references": s.chunk_references,
            "referenced_bytes": s.referenced_bytes,
            "bootstrap_bytes": s.bootstrap_bytes,
            "stored_bytes": s.stored_chunk_bytes + s.bootstrap_bytes,
            "dedup_ratio": s.dedup_ratio(),
        });
        if let Some(oci) = oci {
            value["oci"] = oci;
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("image        {}", file.id);
        println!("paths        {}", s.paths);
        println!("files        {} regular ({} inline), {} symlinks, {} special", s.regular_files, s.inline_files, s.symlinks, s.special_files);
        println!("directories  {}", s.directories);
        println!("logical      {} bytes", s.logical_bytes);
        println!("chunk size   {} bytes", s.chunk_size);
        println!("chunks       {} distinct ({} bytes), {} references ({} bytes)", s.chunks, s.chunk_bytes, s.chunk_references, s.referenced_bytes);
        println!("stored       {} bytes ({} in chunks, {} metadata)", s.stored_chunk_bytes + s.bootstrap_bytes, s.stored_chunk_bytes, s.bootstrap_bytes);
        println!("dedup        {:.2}x", s.dedup_ratio());
        if let Some(oci) = oci {
            print_oci(&oci);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What a converted container image's config says about running it.
fn print_oci(oci: &serde_json::Value) {
    let config = &oci["config"];
    let run = &config["config"];
    let words = |value: &serde_json::Value| value.as_array().map(|items| items.iter().map(|i| i.as_str().unwrap_or_default().to_string()).collect::<Vec<_>>());
    println!("manifest     {}", oci["manifest_digest"].as_str().unwrap_or("?"));
    println!("config       {}", oci["config_digest"].as_str().unwrap_or("?"));
    if let (Some(os), Some(arch)) = (config["os"].as_str(), config["architecture"].as_str()) {
        println!("platform     {os}/{arch}");
    }
    if let Some(entrypoint) = words(&run["Entrypoint"]) {
        println!("entrypoint   {entrypoint:?}");
    }
    if let Some(cmd) = words(&run["Cmd"]) {
        println!("cmd          {cmd:?}");
    }
    if let Some(dir) = run["WorkingDir"].as_str().filter(|d| !d.is_empty()) {
        println!("workdir      {dir}");
    }
    if let Some(user) = run["User"].as_str().filter(|u| !u.is_empty()) {
        println!("user         {user}");
    }
    for variable in words(&run["Env"]).unwrap_or_default() {
        println!("env          {variable}");
    }
}
