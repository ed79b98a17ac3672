// Package store keeps bangerd's state (images and VMs) in SQLite
// (modernc.org/sqlite, WAL) with versioned schema migrations.
package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	_ "modernc.org/sqlite" // database/sql driver "sqlite"

	"github.com/bangerdev/banger/internal/errdefs"
)

// migrations are applied in order; migration i brings the schema to
// version i+1. Never edit a released migration: append a new one.
var migrations = []string{
	`CREATE TABLE images (
		id          TEXT PRIMARY KEY,
		name        TEXT NOT NULL UNIQUE,
		managed     INTEGER NOT NULL DEFAULT 0,
		rootfs      TEXT NOT NULL,
		kernel      TEXT NOT NULL,
		initrd      TEXT NOT NULL DEFAULT '',
		modules_dir TEXT NOT NULL DEFAULT '',
		size_bytes  INTEGER NOT NULL DEFAULT 0,
		created_at  TEXT NOT NULL
	);
	CREATE TABLE vms (
		id            TEXT PRIMARY KEY,
		name          TEXT NOT NULL UNIQUE,
		image_id      TEXT NOT NULL REFERENCES images(id),
		state         TEXT NOT NULL,
		cpus          INTEGER NOT NULL,
		memory_mib    INTEGER NOT NULL,
		disk_bytes    INTEGER NOT NULL,
		disk_path     TEXT NOT NULL,
		disk_format   TEXT NOT NULL,
		disk_strategy TEXT NOT NULL,
		vmm           TEXT NOT NULL,
		accel_wanted  TEXT NOT NULL,
		dir           TEXT NOT NULL,
		handle        TEXT NOT NULL DEFAULT '',
		created_at    TEXT NOT NULL,
		started_at    TEXT NOT NULL DEFAULT '',
		last_error    TEXT NOT NULL DEFAULT ''
	);
	CREATE INDEX vms_image_id ON vms(image_id);`,
	// Fingerprints of the files an image uses, checked before a VM is made
	// or started from it; and, for a promoted image, the rootfs it was
	// copied from (VM disks still backed by it are moved onto the copy).
	`CREATE TABLE image_files (
		image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
		path     TEXT NOT NULL,
		role     TEXT NOT NULL,
		rel      TEXT NOT NULL DEFAULT '',
		link     INTEGER NOT NULL DEFAULT 0,
		size     INTEGER NOT NULL,
		mtime_ns INTEGER NOT NULL,
		inode    INTEGER NOT NULL,
		dev      INTEGER NOT NULL,
		sha256   TEXT NOT NULL DEFAULT '',
		PRIMARY KEY (image_id, path)
	);
	ALTER TABLE images ADD COLUMN promoted_from TEXT NOT NULL DEFAULT '';`,
	// VMs the daemon removes when their command ends or their client goes
	// (vm run --rm).
	`ALTER TABLE vms ADD COLUMN auto_remove INTEGER NOT NULL DEFAULT 0;`,
	// An image file's inode change time: any write changes it, even one
	// whose size and mtime were then restored (0: not recorded).
	`ALTER TABLE image_files ADD COLUMN ctime_ns INTEGER NOT NULL DEFAULT 0;`,
	// Networking: each VM's network mode, its address on banger's bridge
	// (never two VMs on one: the index is the last guard of the
	// allocation), MAC and TAP name, what it may reach, the SSH keys
	// authorised in it and its host keys; its forwarded ports (one host
	// port per protocol and address); an image's default user. VMs made
	// before had no network card: "none".
	`ALTER TABLE vms ADD COLUMN network TEXT NOT NULL DEFAULT 'none';
	ALTER TABLE vms ADD COLUMN ip TEXT;
	ALTER TABLE vms ADD COLUMN mac TEXT NOT NULL DEFAULT '';
	ALTER TABLE vms ADD COLUMN tap TEXT NOT NULL DEFAULT '';
	ALTER TABLE vms ADD COLUMN allow TEXT NOT NULL DEFAULT '[]';
	ALTER TABLE vms ADD COLUMN ssh_keys TEXT NOT NULL DEFAULT '[]';
	ALTER TABLE vms ADD COLUMN ssh_host_keys TEXT NOT NULL DEFAULT '[]';
	CREATE UNIQUE INDEX vms_ip ON vms(ip) WHERE ip IS NOT NULL;
	CREATE TABLE vm_ports (
		vm_id      TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
		proto      TEXT NOT NULL,
		host_ip    TEXT NOT NULL,
		host_port  INTEGER NOT NULL,
		guest_port INTEGER NOT NULL,
		UNIQUE (proto, host_ip, host_port)
	);
	CREATE INDEX vm_ports_vm_id ON vm_ports(vm_id);
	ALTER TABLE images ADD COLUMN default_user TEXT NOT NULL DEFAULT '';`,
	// VMs whose guest's listening ports are forwarded (--publish-all).
	`ALTER TABLE vms ADD COLUMN publish_all INTEGER NOT NULL DEFAULT 0;`,
	// Kernels become objects of their own, shared by images: a kernel
	// image with an optional initrd and modules tree, and the fingerprints
	// of its files (kernel_files, as image_files). An image names its
	// kernel and records where it came from (source, catalog version, OCI
	// reference and digest, OCI config as JSON); a VM may boot another
	// kernel than its image's (kernel_id, '' = the image's), and has a main
	// process command and restart policy (init-less images).
	// kernel_id columns can't be REFERENCES with a '' default (SQLite
	// refuses such an ALTER): DeleteKernel checks the users itself.
	// Each existing image gets a kernel object of its own (same id and
	// name, managed as the image), its kernel, initrd and modules
	// fingerprints move to kernel_files, and the kernel columns leave
	// images: the kernel's files are read through kernel_id.
	`CREATE TABLE kernels (
		id          TEXT PRIMARY KEY,
		name        TEXT NOT NULL UNIQUE,
		managed     INTEGER NOT NULL DEFAULT 0,
		source      TEXT NOT NULL DEFAULT 'registered',
		version     TEXT NOT NULL DEFAULT '',
		release     TEXT NOT NULL DEFAULT '',
		kernel      TEXT NOT NULL,
		initrd      TEXT NOT NULL DEFAULT '',
		modules_dir TEXT NOT NULL DEFAULT '',
		ref         TEXT NOT NULL DEFAULT '',
		digest      TEXT NOT NULL DEFAULT '',
		size_bytes  INTEGER NOT NULL DEFAULT 0,
		created_at  TEXT NOT NULL
	);
	CREATE TABLE kernel_files (
		kernel_id TEXT NOT NULL REFERENCES kernels(id) ON DELETE CASCADE,
		path      TEXT NOT NULL,
		role      TEXT NOT NULL,
		rel       TEXT NOT NULL DEFAULT '',
		link      INTEGER NOT NULL DEFAULT 0,
		size      INTEGER NOT NULL,
		mtime_ns  INTEGER NOT NULL,
		ctime_ns  INTEGER NOT NULL DEFAULT 0,
		inode     INTEGER NOT NULL,
		dev       INTEGER NOT NULL,
		sha256    TEXT NOT NULL DEFAULT '',
		PRIMARY KEY (kernel_id, path)
	);
	ALTER TABLE images ADD COLUMN kernel_id TEXT NOT NULL DEFAULT '';
	ALTER TABLE images ADD COLUMN source TEXT NOT NULL DEFAULT 'registered';
	ALTER TABLE images ADD COLUMN version TEXT NOT NULL DEFAULT '';
	ALTER TABLE images ADD COLUMN ref TEXT NOT NULL DEFAULT '';
	ALTER TABLE images ADD COLUMN digest TEXT NOT NULL DEFAULT '';
	ALTER TABLE images ADD COLUMN config TEXT NOT NULL DEFAULT '';
	ALTER TABLE vms ADD COLUMN kernel_id TEXT NOT NULL DEFAULT '';
	ALTER TABLE vms ADD COLUMN cmd TEXT NOT NULL DEFAULT '[]';
	ALTER TABLE vms ADD COLUMN restart TEXT NOT NULL DEFAULT '';
	CREATE INDEX images_kernel_id ON images(kernel_id);
	CREATE INDEX vms_kernel_id ON vms(kernel_id);
	INSERT INTO kernels (id, name, managed, source, kernel, initrd, modules_dir, size_bytes, created_at)
		SELECT id, name, managed, 'registered', kernel, initrd, modules_dir,
			(SELECT COALESCE(SUM(size), 0) FROM image_files f WHERE f.image_id = images.id AND f.role IN ('kernel', 'initrd', 'modules') AND f.link = 0),
			created_at
		FROM images;
	INSERT INTO kernel_files (kernel_id, path, role, rel, link, size, mtime_ns, ctime_ns, inode, dev, sha256)
		SELECT image_id, path, role, rel, link, size, mtime_ns, ctime_ns, inode, dev, sha256
		FROM image_files WHERE role IN ('kernel', 'initrd', 'modules');
	DELETE FROM image_files WHERE role IN ('kernel', 'initrd', 'modules');
	UPDATE images SET kernel_id = id;
	ALTER TABLE images DROP COLUMN kernel;
	ALTER TABLE images DROP COLUMN initrd;
	ALTER TABLE images DROP COLUMN modules_dir;`,
}

// Store is the state database.
type Store struct {
	db *sql.DB
}

// Open opens (creating if needed) the database at path and migrates it.
func Open(ctx context.Context, path string) (*Store, error) {
	dsn := "file:" + path + "?_pragma=journal_mode(WAL)&_pragma=busy_timeout(5000)&_pragma=foreign_keys(1)&_pragma=synchronous(NORMAL)"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("open state database %s: %w", path, err)
	}
	// One writer; SQLite serialises writes anyway and this avoids SQLITE_BUSY.
	db.SetMaxOpenConns(1)
	s := &Store{db: db}
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("migrate state database %s: %w", path, err)
	}
	return s, nil
}

// Close closes the database.
func (s *Store) Close() error { return s.db.Close() }

// SchemaVersion returns the schema version.
func (s *Store) SchemaVersion(ctx context.Context) (int, error) {
	var v int
	err := s.db.QueryRowContext(ctx, `PRAGMA user_version`).Scan(&v)
	return v, err
}

func (s *Store) migrate(ctx context.Context) error {
	v, err := s.SchemaVersion(ctx)
	if err != nil {
		return err
	}
	if v > len(migrations) {
		return fmt.Errorf("schema version %d is newer than this bangerd knows (%d): upgrade banger", v, len(migrations))
	}
	for i := v; i < len(migrations); i++ {
		tx, err := s.db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, migrations[i]); err != nil {
			tx.Rollback()
			return fmt.Errorf("migration %d: %w", i+1, err)
		}
		if _, err := tx.ExecContext(ctx, fmt.Sprintf(`PRAGMA user_version = %d`, i+1)); err != nil {
			tx.Rollback()
			return fmt.Errorf("migration %d: set version: %w", i+1, err)
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("migration %d: commit: %w", i+1, err)
		}
	}
	return nil
}

// Image is a stored image: a root filesystem and the kernel object it
// boots with.
type Image struct {
	ID      string
	Name    string
	Managed bool
	Rootfs  string
	// KernelID is the kernel object the image boots with.
	KernelID string
	// KernelName, Kernel, Initrd and ModulesDir are read only: the kernel
	// object's name and files (GetImage, ListImages).
	KernelName string
	Kernel     string
	Initrd     string
	ModulesDir string
	SizeBytes  int64
	CreatedAt  time.Time
	// PromotedFrom is the rootfs a managed image was copied from (empty for
	// images registered unmanaged and never promoted).
	PromotedFrom string
	// DefaultUser is the user `vm ssh` logs in as ("" = root).
	DefaultUser string
	// Source is where the image came from (api.Source*: registered,
	// catalog, oci, local-build); Version its catalog version, Ref the
	// OCI reference or bundle URL, Digest the OCI manifest digest or the
	// bundle's sha256.
	Source  string
	Version string
	Ref     string
	Digest  string
	// ConfigJSON is the image's api.ImageConfig as JSON ("" = none).
	ConfigJSON string
	// Files, when not nil, are written by InsertImage and UpdateImage (in
	// the same transaction as the image). GetImage and ListImages leave it
	// nil: read them with ImageFiles. An image's files are its rootfs (and
	// other files of its own); its kernel's are the kernel's (KernelFiles).
	Files []ImageFile
}

// Kernel is a stored kernel object: a kernel image, an optional initrd
// and modules tree, shared by images (and VMs booting it instead of
// their image's).
type Kernel struct {
	ID      string
	Name    string
	Managed bool // its files are banger's (under the state dir)
	// Source: api.SourceRegistered, SourceImported, SourceCatalog,
	// SourceLocalBuild.
	Source     string
	Version    string
	Release    string // uname -r of the kernel ("" = not read)
	Kernel     string
	Initrd     string
	ModulesDir string
	Ref        string
	Digest     string
	SizeBytes  int64
	CreatedAt  time.Time
	// Files, when not nil, are written by InsertKernel and UpdateKernel
	// in the same transaction. GetKernel and ListKernels leave it nil:
	// read them with KernelFiles.
	Files []ImageFile
}

// ImageFile is the fingerprint of one file an image uses.
type ImageFile struct {
	Path    string
	Role    string // rootfs, kernel, initrd or modules
	Rel     string // path inside the modules tree (modules only)
	Link    bool   // a symlink, fingerprinted itself (not its target)
	Size    int64
	MTimeNS int64
	CTimeNS int64 // 0 when not recorded
	Inode   uint64
	Dev     uint64
	SHA256  string // hex; set when banger copied the file (promote)
}

// VM is a stored VM.
type VM struct {
	ID           string
	Name         string
	ImageID      string
	State        string
	CPUs         int
	MemoryMiB    int
	DiskBytes    int64
	DiskPath     string
	DiskFormat   string
	DiskStrategy string
	VMM          string
	AccelWanted  string
	Dir          string
	Handle       string // JSON vmm.Handle while running
	ImageName    string // read only: the name of ImageID
	CreatedAt    time.Time
	StartedAt    time.Time
	LastError    string
	AutoRemove   bool // removed by the daemon when its command ends or its client goes (vm run --rm)

	// Network is the VM's network mode (bridge, user or none).
	Network string
	// IP is the VM's address on banger's bridge (bridge mode; "" otherwise).
	IP  string
	MAC string
	TAP string // bridge mode: the TAP device's name
	// Allow lists what the VM may reach beyond the daemon's defaults
	// (host, vm, lan, link-local).
	Allow []string
	// SSHKeys are authorised for the image's default user at each boot.
	SSHKeys []string
	// SSHHostKeys are the guest's SSH host keys learned at the last boot.
	SSHHostKeys []string
	// Ports are the VM's forwarded ports, by protocol, address and port.
	Ports []Port
	// PublishAll: the guest's listening ports are forwarded while it runs
	// (vm create --publish-all).
	PublishAll bool
	// KernelID is the kernel the VM boots instead of its image's
	// (vm create --kernel); "" = the image's.
	KernelID string
	// KernelName is read only: the name of the kernel the VM boots
	// (KernelID's, else its image's).
	KernelName string
	// Cmd replaces the image's Cmd for the main process (JSON argv).
	Cmd []string
	// Restart is the main process's restart policy ("" = no).
	Restart string
}

// Port is a forwarded port of a VM.
type Port struct {
	Proto     string // tcp or udp
	HostIP    string
	HostPort  int
	GuestPort int
}

func fmtTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339Nano)
}

func parseTime(s string) time.Time {
	t, _ := time.Parse(time.RFC3339Nano, s)
	return t
}

func isUnique(err error) bool {
	return err != nil && strings.Contains(err.Error(), "UNIQUE constraint failed")
}

// InsertImage adds an image, with its Files. A duplicate name is
// errdefs.ErrAlreadyExists; the kernel must exist (unless KernelID is
// empty: an image without a kernel can't boot, the daemon never makes
// one).
func (s *Store) InsertImage(ctx context.Context, im Image) error {
	return s.InsertImageAndKernel(ctx, im, nil)
}

// InsertImageAndKernel adds a kernel (when k is not nil) and an image in
// one transaction: both or neither.
func (s *Store) InsertImageAndKernel(ctx context.Context, im Image, k *Kernel) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("insert image %q: %w", im.Name, err)
	}
	defer tx.Rollback()
	if k != nil {
		if err := insertKernel(ctx, tx, *k); err != nil {
			return err
		}
	}
	if err := kernelExists(ctx, tx, im.KernelID); err != nil {
		return fmt.Errorf("insert image %q: %w", im.Name, err)
	}
	_, err = tx.ExecContext(ctx, `INSERT INTO images (id, name, managed, rootfs, kernel_id, size_bytes, created_at, promoted_from, default_user, source, version, ref, digest, config)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		im.ID, im.Name, im.Managed, im.Rootfs, im.KernelID, im.SizeBytes, fmtTime(im.CreatedAt), im.PromotedFrom, im.DefaultUser,
		sourceOr(im.Source), im.Version, im.Ref, im.Digest, im.ConfigJSON)
	if isUnique(err) {
		return fmt.Errorf("image %q: %w", im.Name, errdefs.ErrAlreadyExists)
	}
	if err != nil {
		return fmt.Errorf("insert image %q: %w", im.Name, err)
	}
	if err := writeFiles(ctx, tx, "image", im.ID, im.Name, im.Files); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("insert image %q: %w", im.Name, err)
	}
	return nil
}

// sourceOr is the source of a row: "registered" when none is given.
func sourceOr(s string) string {
	if s == "" {
		return "registered"
	}
	return s
}

// kernelExists checks that a kernel id names a kernel ("" passes).
func kernelExists(ctx context.Context, tx *sql.Tx, id string) error {
	if id == "" {
		return nil
	}
	var n int
	if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM kernels WHERE id = ?`, id).Scan(&n); err != nil {
		return err
	}
	if n == 0 {
		return fmt.Errorf("kernel %s: %w", id, errdefs.ErrNotFound)
	}
	return nil
}

// UpdateImage replaces an image's fields (by id), and its files when
// im.Files is not nil, in one transaction.
func (s *Store) UpdateImage(ctx context.Context, im Image) error {
	return s.UpdateImageAndKernel(ctx, im, nil)
}

// UpdateImageAndKernel updates an image and (when k is not nil) a kernel
// in one transaction, each with its files when Files is not nil (image
// promote: both copies become the objects' files at once).
func (s *Store) UpdateImageAndKernel(ctx context.Context, im Image, k *Kernel) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("update image %q: %w", im.Name, err)
	}
	defer tx.Rollback()
	if k != nil {
		if err := updateKernel(ctx, tx, *k); err != nil {
			return err
		}
	}
	if err := kernelExists(ctx, tx, im.KernelID); err != nil {
		return fmt.Errorf("update image %q: %w", im.Name, err)
	}
	res, err := tx.ExecContext(ctx, `UPDATE images SET name=?, managed=?, rootfs=?, kernel_id=?, size_bytes=?, promoted_from=?, default_user=?, source=?, version=?, ref=?, digest=?, config=? WHERE id=?`,
		im.Name, im.Managed, im.Rootfs, im.KernelID, im.SizeBytes, im.PromotedFrom, im.DefaultUser, sourceOr(im.Source), im.Version, im.Ref, im.Digest, im.ConfigJSON, im.ID)
	if err != nil {
		return fmt.Errorf("update image %q: %w", im.Name, err)
	}
	if n, err := res.RowsAffected(); err == nil && n == 0 {
		return fmt.Errorf("image %q: %w", im.Name, errdefs.ErrNotFound)
	}
	if err := writeFiles(ctx, tx, "image", im.ID, im.Name, im.Files); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("update image %q: %w", im.Name, err)
	}
	return nil
}

// writeFiles replaces the files of an image or kernel (kind) when files
// is not nil.
func writeFiles(ctx context.Context, tx *sql.Tx, kind, id, name string, files []ImageFile) error {
	if files == nil {
		return nil
	}
	table, col := "image_files", "image_id"
	if kind == "kernel" {
		table, col = "kernel_files", "kernel_id"
	}
	if _, err := tx.ExecContext(ctx, `DELETE FROM `+table+` WHERE `+col+` = ?`, id); err != nil {
		return fmt.Errorf("write files of %s %q: %w", kind, name, err)
	}
	stmt, err := tx.PrepareContext(ctx, `INSERT INTO `+table+` (`+col+`, path, role, rel, link, size, mtime_ns, ctime_ns, inode, dev, sha256)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`)
	if err != nil {
		return fmt.Errorf("write files of %s %q: %w", kind, name, err)
	}
	defer stmt.Close()
	for _, f := range files {
		if _, err := stmt.ExecContext(ctx, id, f.Path, f.Role, f.Rel, f.Link, f.Size, f.MTimeNS, f.CTimeNS, int64(f.Inode), int64(f.Dev), f.SHA256); err != nil {
			return fmt.Errorf("write files of %s %q: %s: %w", kind, name, f.Path, err)
		}
	}
	return nil
}

// AddImageFilesIfNone records files for the image id when it has none yet
// (an image registered before fingerprints were kept), and reports
// whether it did. Unlike UpdateImage it touches nothing else, so it can't
// undo a concurrent update of the image.
func (s *Store) AddImageFilesIfNone(ctx context.Context, id string, files []ImageFile) (bool, error) {
	return s.addFilesIfNone(ctx, "image", id, files)
}

// AddKernelFilesIfNone is AddImageFilesIfNone for a kernel.
func (s *Store) AddKernelFilesIfNone(ctx context.Context, id string, files []ImageFile) (bool, error) {
	return s.addFilesIfNone(ctx, "kernel", id, files)
}

func (s *Store) addFilesIfNone(ctx context.Context, kind, id string, files []ImageFile) (bool, error) {
	table, col := "image_files", "image_id"
	if kind == "kernel" {
		table, col = "kernel_files", "kernel_id"
	}
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return false, fmt.Errorf("record files of %s %s: %w", kind, id, err)
	}
	defer tx.Rollback()
	var n int
	if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM `+table+` WHERE `+col+` = ?`, id).Scan(&n); err != nil {
		return false, fmt.Errorf("record files of %s %s: %w", kind, id, err)
	}
	if n > 0 {
		return false, nil
	}
	if err := writeFiles(ctx, tx, kind, id, id, files); err != nil {
		return false, err
	}
	if err := tx.Commit(); err != nil {
		return false, fmt.Errorf("record files of %s %s: %w", kind, id, err)
	}
	return true, nil
}

// ImageFiles returns the recorded files of an image, by path; none for an
// image registered before fingerprints were kept.
func (s *Store) ImageFiles(ctx context.Context, id string) ([]ImageFile, error) {
	return s.files(ctx, "image", id)
}

// KernelFiles returns the recorded files of a kernel, by path.
func (s *Store) KernelFiles(ctx context.Context, id string) ([]ImageFile, error) {
	return s.files(ctx, "kernel", id)
}

func (s *Store) files(ctx context.Context, kind, id string) ([]ImageFile, error) {
	table, col := "image_files", "image_id"
	if kind == "kernel" {
		table, col = "kernel_files", "kernel_id"
	}
	rows, err := s.db.QueryContext(ctx, `SELECT path, role, rel, link, size, mtime_ns, ctime_ns, inode, dev, sha256 FROM `+table+` WHERE `+col+` = ? ORDER BY path`, id)
	if err != nil {
		return nil, fmt.Errorf("files of %s %s: %w", kind, id, err)
	}
	defer rows.Close()
	out := []ImageFile{}
	for rows.Next() {
		var f ImageFile
		var inode, dev int64
		if err := rows.Scan(&f.Path, &f.Role, &f.Rel, &f.Link, &f.Size, &f.MTimeNS, &f.CTimeNS, &inode, &dev, &f.SHA256); err != nil {
			return nil, fmt.Errorf("files of %s %s: %w", kind, id, err)
		}
		f.Inode, f.Dev = uint64(inode), uint64(dev)
		out = append(out, f)
	}
	return out, rows.Err()
}

// imageSelect reads an image with its kernel's name and files.
const imageSelect = `SELECT images.id, images.name, images.managed, images.rootfs, images.kernel_id,
	COALESCE(k.name, ''), COALESCE(k.kernel, ''), COALESCE(k.initrd, ''), COALESCE(k.modules_dir, ''),
	images.size_bytes, images.created_at, images.promoted_from, images.default_user,
	images.source, images.version, images.ref, images.digest, images.config
	FROM images LEFT JOIN kernels k ON k.id = images.kernel_id`

func scanImage(row interface{ Scan(...any) error }) (Image, error) {
	var im Image
	var created string
	err := row.Scan(&im.ID, &im.Name, &im.Managed, &im.Rootfs, &im.KernelID, &im.KernelName, &im.Kernel, &im.Initrd, &im.ModulesDir,
		&im.SizeBytes, &created, &im.PromotedFrom, &im.DefaultUser, &im.Source, &im.Version, &im.Ref, &im.Digest, &im.ConfigJSON)
	im.CreatedAt = parseTime(created)
	return im, err
}

// GetImage finds an image by id or name; an id wins over a name.
func (s *Store) GetImage(ctx context.Context, ref string) (Image, error) {
	im, err := scanImage(s.db.QueryRowContext(ctx, imageSelect+` WHERE images.name = ? OR images.id = ? ORDER BY images.id = ? DESC LIMIT 1`, ref, ref, ref))
	if errors.Is(err, sql.ErrNoRows) {
		return Image{}, fmt.Errorf("image %s: %w", errdefs.Quote(ref), errdefs.ErrNotFound)
	}
	if err != nil {
		return Image{}, fmt.Errorf("get image %s: %w", errdefs.Quote(ref), err)
	}
	return im, nil
}

// ListImages returns all images by name.
func (s *Store) ListImages(ctx context.Context) ([]Image, error) {
	rows, err := s.db.QueryContext(ctx, imageSelect+` ORDER BY images.name`)
	if err != nil {
		return nil, fmt.Errorf("list images: %w", err)
	}
	defer rows.Close()
	var out []Image
	for rows.Next() {
		im, err := scanImage(rows)
		if err != nil {
			return nil, fmt.Errorf("list images: %w", err)
		}
		out = append(out, im)
	}
	return out, rows.Err()
}

// DeleteImage removes an image. It fails with ErrFailedPrecondition while a
// VM references it (checked in the same transaction).
func (s *Store) DeleteImage(ctx context.Context, id string) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	users, err := names(ctx, tx, `SELECT name FROM vms WHERE image_id = ? ORDER BY name`, id)
	if err != nil {
		return fmt.Errorf("delete image: %w", err)
	}
	if len(users) > 0 {
		return fmt.Errorf("image is used by VM(s) %s: remove them first: %w", strings.Join(users, ", "), errdefs.ErrFailedPrecondition)
	}
	if _, err := tx.ExecContext(ctx, `DELETE FROM images WHERE id = ?`, id); err != nil {
		return fmt.Errorf("delete image: %w", err)
	}
	return tx.Commit()
}

type querier interface {
	QueryContext(ctx context.Context, q string, args ...any) (*sql.Rows, error)
}

// names runs a query of one text column.
func names(ctx context.Context, q querier, query string, args ...any) ([]string, error) {
	rows, err := q.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var n string
		if err := rows.Scan(&n); err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	return out, rows.Err()
}

// ImageUsers returns the names of the VMs using an image.
func (s *Store) ImageUsers(ctx context.Context, id string) ([]string, error) {
	return names(ctx, s.db, `SELECT name FROM vms WHERE image_id = ? ORDER BY name`, id)
}

const vmCols = `id, name, image_id, state, cpus, memory_mib, disk_bytes, disk_path, disk_format, disk_strategy, vmm, accel_wanted, dir, handle, created_at, started_at, last_error, auto_remove, network, ip, mac, tap, allow, ssh_keys, ssh_host_keys, publish_all, kernel_id, cmd, restart`

// vmSelect reads a VM with its image's name and the name of the kernel
// it boots.
const vmSelect = `SELECT ` + vmCols + `, (SELECT name FROM images WHERE images.id = vms.image_id),
	(SELECT name FROM kernels WHERE kernels.id = COALESCE(NULLIF(vms.kernel_id, ''), (SELECT kernel_id FROM images WHERE images.id = vms.image_id))) FROM vms`

func scanVM(row interface{ Scan(...any) error }) (VM, error) {
	var v VM
	var created, started, allow, sshKeys, hostKeys, cmd string
	var imageName, kernelName, ip sql.NullString
	err := row.Scan(&v.ID, &v.Name, &v.ImageID, &v.State, &v.CPUs, &v.MemoryMiB, &v.DiskBytes, &v.DiskPath, &v.DiskFormat, &v.DiskStrategy,
		&v.VMM, &v.AccelWanted, &v.Dir, &v.Handle, &created, &started, &v.LastError, &v.AutoRemove,
		&v.Network, &ip, &v.MAC, &v.TAP, &allow, &sshKeys, &hostKeys, &v.PublishAll,
		&v.KernelID, &cmd, &v.Restart, &imageName, &kernelName)
	if err != nil {
		return v, err
	}
	v.ImageName = imageName.String
	v.KernelName = kernelName.String
	v.IP = ip.String
	v.CreatedAt = parseTime(created)
	v.StartedAt = parseTime(started)
	for _, f := range []struct {
		col string
		dst *[]string
	}{{allow, &v.Allow}, {sshKeys, &v.SSHKeys}, {hostKeys, &v.SSHHostKeys}, {cmd, &v.Cmd}} {
		if err := json.Unmarshal([]byte(f.col), f.dst); err != nil {
			return v, fmt.Errorf("vm %s: decode %q: %w", v.ID, f.col, err)
		}
	}
	return v, nil
}

func jsonList(l []string) string {
	if l == nil {
		l = []string{}
	}
	b, _ := json.Marshal(l)
	return string(b)
}

func nullIfEmpty(s string) any {
	if s == "" {
		return nil
	}
	return s
}

// InsertVM adds a VM with its ports. A duplicate name is
// errdefs.ErrAlreadyExists; so is a host port another VM forwards
// (same protocol and port, same address or either one the wildcard).
func (s *Store) InsertVM(ctx context.Context, v VM) error {
	_, err := s.insertVM(ctx, v, netip.Prefix{})
	return err
}

// InsertVMWithAddress adds a VM as InsertVM does, with the lowest free
// host address of subnet as its IP (not the network address, the gateway
// (the first host address) or the broadcast address), chosen in the same
// transaction as the insert. It returns the VM with its IP.
// The daemon serialises its creates; the unique index on vms.ip guards
// against anything else.
func (s *Store) InsertVMWithAddress(ctx context.Context, v VM, subnet netip.Prefix) (VM, error) {
	if !subnet.IsValid() || !subnet.Addr().Is4() {
		return v, fmt.Errorf("allocate an address for vm %q: bad subnet %s: %w", v.Name, subnet, errdefs.ErrInvalid)
	}
	return s.insertVM(ctx, v, subnet.Masked())
}

func (s *Store) insertVM(ctx context.Context, v VM, subnet netip.Prefix) (VM, error) {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return v, fmt.Errorf("insert vm %q: %w", v.Name, err)
	}
	defer tx.Rollback()
	if subnet.IsValid() {
		ip, err := freeAddress(ctx, tx, subnet)
		if err != nil {
			return v, fmt.Errorf("allocate an address for vm %q: %w", v.Name, err)
		}
		v.IP = ip.String()
	}
	if err := kernelExists(ctx, tx, v.KernelID); err != nil {
		return v, fmt.Errorf("insert vm %q: %w", v.Name, err)
	}
	_, err = tx.ExecContext(ctx, `INSERT INTO vms (`+vmCols+`) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		v.ID, v.Name, v.ImageID, v.State, v.CPUs, v.MemoryMiB, v.DiskBytes, v.DiskPath, v.DiskFormat, v.DiskStrategy,
		v.VMM, v.AccelWanted, v.Dir, v.Handle, fmtTime(v.CreatedAt), fmtTime(v.StartedAt), v.LastError, v.AutoRemove,
		v.Network, nullIfEmpty(v.IP), v.MAC, v.TAP, jsonList(v.Allow), jsonList(v.SSHKeys), jsonList(v.SSHHostKeys), v.PublishAll,
		v.KernelID, jsonList(v.Cmd), v.Restart)
	if isUnique(err) {
		if strings.Contains(err.Error(), "vms.ip") {
			return v, fmt.Errorf("vm %q: address %s is taken: %w", v.Name, v.IP, errdefs.ErrAlreadyExists)
		}
		return v, fmt.Errorf("vm %q: %w", v.Name, errdefs.ErrAlreadyExists)
	}
	if err != nil {
		return v, fmt.Errorf("insert vm %q: %w", v.Name, err)
	}
	for _, p := range v.Ports {
		if err := insertPort(ctx, tx, v.ID, p); err != nil {
			return v, fmt.Errorf("vm %q: %w", v.Name, err)
		}
	}
	if err := tx.Commit(); err != nil {
		return v, fmt.Errorf("insert vm %q: %w", v.Name, err)
	}
	return v, nil
}

// freeAddress returns the lowest host address of subnet that no VM has,
// skipping the gateway (the first host address) and the broadcast address.
func freeAddress(ctx context.Context, tx *sql.Tx, subnet netip.Prefix) (netip.Addr, error) {
	rows, err := tx.QueryContext(ctx, `SELECT ip FROM vms WHERE ip IS NOT NULL`)
	if err != nil {
		return netip.Addr{}, err
	}
	taken := map[netip.Addr]bool{}
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			rows.Close()
			return netip.Addr{}, err
		}
		if a, err := netip.ParseAddr(s); err == nil {
			taken[a] = true
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return netip.Addr{}, err
	}
	// network, gateway, then VMs up to the broadcast address (excluded).
	for a := subnet.Addr().Next().Next(); subnet.Contains(a); a = a.Next() {
		if !subnet.Contains(a.Next()) {
			break // a is the broadcast address
		}
		if !taken[a] {
			return a, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("subnet %s is full (%d VMs have its addresses): remove VMs or configure a larger subnet: %w",
		subnet, len(taken), errdefs.ErrFailedPrecondition)
}

// insertPort records a forwarded port; one taken by another VM is
// ErrAlreadyExists, naming the VM.
func insertPort(ctx context.Context, tx *sql.Tx, id string, p Port) error {
	var other string
	err := tx.QueryRowContext(ctx, `SELECT vms.name FROM vm_ports JOIN vms ON vms.id = vm_ports.vm_id
		WHERE proto = ? AND host_port = ? AND (host_ip = ? OR host_ip IN ('0.0.0.0', '::') OR ? IN ('0.0.0.0', '::')) LIMIT 1`,
		p.Proto, p.HostPort, p.HostIP, p.HostIP).Scan(&other)
	switch {
	case err == nil:
		return fmt.Errorf("host port %s:%d/%s is already forwarded to vm %q: %w", p.HostIP, p.HostPort, p.Proto, other, errdefs.ErrAlreadyExists)
	case !errors.Is(err, sql.ErrNoRows):
		return fmt.Errorf("record port %d/%s: %w", p.HostPort, p.Proto, err)
	}
	_, err = tx.ExecContext(ctx, `INSERT INTO vm_ports (vm_id, proto, host_ip, host_port, guest_port) VALUES (?, ?, ?, ?, ?)`,
		id, p.Proto, p.HostIP, p.HostPort, p.GuestPort)
	if isUnique(err) {
		return fmt.Errorf("host port %s:%d/%s is given twice: %w", p.HostIP, p.HostPort, p.Proto, errdefs.ErrAlreadyExists)
	}
	if err != nil {
		return fmt.Errorf("record port %d/%s: %w", p.HostPort, p.Proto, err)
	}
	return nil
}

// loadPorts fills the Ports of vms.
func (s *Store) loadPorts(ctx context.Context, vms []VM) error {
	if len(vms) == 0 {
		return nil
	}
	idx := map[string]int{}
	for i := range vms {
		idx[vms[i].ID] = i
	}
	q := `SELECT vm_id, proto, host_ip, host_port, guest_port FROM vm_ports`
	var args []any
	if len(vms) == 1 {
		q += ` WHERE vm_id = ?`
		args = append(args, vms[0].ID)
	}
	rows, err := s.db.QueryContext(ctx, q+` ORDER BY proto, host_ip, host_port`, args...)
	if err != nil {
		return fmt.Errorf("read vm ports: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var id string
		var p Port
		if err := rows.Scan(&id, &p.Proto, &p.HostIP, &p.HostPort, &p.GuestPort); err != nil {
			return fmt.Errorf("read vm ports: %w", err)
		}
		if i, ok := idx[id]; ok {
			vms[i].Ports = append(vms[i].Ports, p)
		}
	}
	return rows.Err()
}

// ReassignAddress gives the VM id the lowest free host address of subnet
// (as InsertVMWithAddress chooses one) and returns it: for a VM whose
// address is outside a subnet the configuration changed.
func (s *Store) ReassignAddress(ctx context.Context, id string, subnet netip.Prefix) (string, error) {
	if !subnet.IsValid() || !subnet.Addr().Is4() {
		return "", fmt.Errorf("reassign the address of vm %s: bad subnet %s: %w", id, subnet, errdefs.ErrInvalid)
	}
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return "", fmt.Errorf("reassign the address of vm %s: %w", id, err)
	}
	defer tx.Rollback()
	ip, err := freeAddress(ctx, tx, subnet.Masked())
	if err != nil {
		return "", fmt.Errorf("reassign the address of vm %s: %w", id, err)
	}
	res, err := tx.ExecContext(ctx, `UPDATE vms SET ip = ? WHERE id = ?`, ip.String(), id)
	if err != nil {
		return "", fmt.Errorf("reassign the address of vm %s: %w", id, err)
	}
	if n, err := res.RowsAffected(); err == nil && n == 0 {
		return "", fmt.Errorf("vm %s: %w", id, errdefs.ErrNotFound)
	}
	if err := tx.Commit(); err != nil {
		return "", fmt.Errorf("reassign the address of vm %s: %w", id, err)
	}
	return ip.String(), nil
}

// SetSSHHostKeys records the guest's SSH host keys (learned at a boot).
func (s *Store) SetSSHHostKeys(ctx context.Context, id string, keys []string) error {
	if _, err := s.db.ExecContext(ctx, `UPDATE vms SET ssh_host_keys = ? WHERE id = ?`, jsonList(keys), id); err != nil {
		return fmt.Errorf("record ssh host keys of vm %s: %w", id, err)
	}
	return nil
}

// VMByMAC finds the VM with that MAC address (DHCP leases).
func (s *Store) VMByMAC(ctx context.Context, mac string) (VM, error) {
	v, err := scanVM(s.db.QueryRowContext(ctx, vmSelect+` WHERE mac = ? AND mac != '' LIMIT 1`, strings.ToLower(mac)))
	if errors.Is(err, sql.ErrNoRows) {
		return VM{}, fmt.Errorf("vm with mac %s: %w", mac, errdefs.ErrNotFound)
	}
	if err != nil {
		return VM{}, fmt.Errorf("get vm by mac %s: %w", mac, err)
	}
	return v, nil
}

// UpdateVM writes a VM's mutable fields (by id).
func (s *Store) UpdateVM(ctx context.Context, v VM) error {
	_, err := s.db.ExecContext(ctx, `UPDATE vms SET state=?, handle=?, started_at=?, last_error=? WHERE id=?`,
		v.State, v.Handle, fmtTime(v.StartedAt), v.LastError, v.ID)
	if err != nil {
		return fmt.Errorf("update vm %q: %w", v.Name, err)
	}
	return nil
}

// GetVM finds a VM by id or name; an id wins over a name (a VM made
// before names were checked against ids may carry another's id as name).
func (s *Store) GetVM(ctx context.Context, ref string) (VM, error) {
	v, err := scanVM(s.db.QueryRowContext(ctx, vmSelect+` WHERE name = ? OR id = ? ORDER BY id = ? DESC LIMIT 1`, ref, ref, ref))
	if errors.Is(err, sql.ErrNoRows) {
		return VM{}, fmt.Errorf("vm %s: %w", errdefs.Quote(ref), errdefs.ErrNotFound)
	}
	if err != nil {
		return VM{}, fmt.Errorf("get vm %s: %w", errdefs.Quote(ref), err)
	}
	one := []VM{v}
	if err := s.loadPorts(ctx, one); err != nil {
		return VM{}, err
	}
	return one[0], nil
}

// ListVMs returns all VMs by name.
func (s *Store) ListVMs(ctx context.Context) ([]VM, error) {
	rows, err := s.db.QueryContext(ctx, vmSelect+` ORDER BY name`)
	if err != nil {
		return nil, fmt.Errorf("list vms: %w", err)
	}
	defer rows.Close()
	var out []VM
	for rows.Next() {
		v, err := scanVM(rows)
		if err != nil {
			return nil, fmt.Errorf("list vms: %w", err)
		}
		out = append(out, v)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list vms: %w", err)
	}
	rows.Close()
	if err := s.loadPorts(ctx, out); err != nil {
		return nil, err
	}
	return out, nil
}

// VMNameTaken reports whether a VM has that name, or that id: a name
// equal to another VM's id would make lookups ambiguous.
func (s *Store) VMNameTaken(ctx context.Context, name string) (bool, error) {
	var n int
	if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM vms WHERE name = ? OR id = ?`, name, name).Scan(&n); err != nil {
		return false, fmt.Errorf("check vm name %s: %w", errdefs.Quote(name), err)
	}
	return n > 0, nil
}

// MarkStopped records a VM as stopped, without handle, if its row still
// records handle (compared as stored): a monitor of an old boot never
// marks a newer boot stopped. It reports whether the row changed.
func (s *Store) MarkStopped(ctx context.Context, id, handle string) (bool, error) {
	res, err := s.db.ExecContext(ctx, `UPDATE vms SET state = 'stopped', handle = '' WHERE id = ? AND handle = ?`, id, handle)
	if err != nil {
		return false, fmt.Errorf("mark vm %s stopped: %w", id, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("mark vm %s stopped: %w", id, err)
	}
	return n > 0, nil
}

// DeleteVM removes a VM row.
func (s *Store) DeleteVM(ctx context.Context, id string) error {
	if _, err := s.db.ExecContext(ctx, `DELETE FROM vms WHERE id = ?`, id); err != nil {
		return fmt.Errorf("delete vm: %w", err)
	}
	return nil
}

// CreateAtVersion makes a database at path with the schema of version v
// (older than this bangerd's), for tests of what a migration must keep:
// state written by an older bangerd. The caller fills and closes it.
func CreateAtVersion(ctx context.Context, path string, v int) (*sql.DB, error) {
	if v < 1 || v > len(migrations) {
		return nil, fmt.Errorf("schema version %d: want 1 to %d", v, len(migrations))
	}
	db, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		return nil, err
	}
	for i := 0; i < v; i++ {
		if _, err := db.ExecContext(ctx, migrations[i]); err != nil {
			db.Close()
			return nil, fmt.Errorf("migration %d: %w", i+1, err)
		}
	}
	if _, err := db.ExecContext(ctx, fmt.Sprintf(`PRAGMA user_version = %d`, v)); err != nil {
		db.Close()
		return nil, err
	}
	return db, nil
}

// Version is the schema version this bangerd writes.
func Version() int { return len(migrations) }
