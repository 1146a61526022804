/** The shapes the Twarga REST API answers with (see DESIGN.md, "API contract"). */

export type VMStatus =
  | 'pending'
  | 'starting'
  | 'running'
  | 'paused'
  | 'stopping'
  | 'stopped'
  | 'error'
  | 'destroying';

export type VMAction = 'start' | 'stop' | 'restart' | 'destroy' | 'force-stop';

export interface IVM {
  id: number;
  name: string;
  owner: string;
  status: VMStatus;
  status_message: string | null;
  image: string;
  os_type: string;
  ram: number;
  cpu: number;
  disk: number;
  ip_address: string | null;
  ssh_host: string | null;
  ssh_port: number | null;
  domain: string | null;
  created_at: string;
  started_at: string | null;
  uptime: number;
  /**
   * Whether the guest has reported in (cloud-init's final message, the image's banner or
   * sshd answering); false whenever the VM is not running. A service from before this
   * field sends none: a running VM then counts as ready.
   */
  ready?: boolean;
}

export interface IQuota {
  max_vms: number;
  max_ram_mb: number;
  max_cpu?: number | null;
  max_disk_gb?: number | null;
}

export interface IUsage {
  vms: number;
  ram_mb: number;
  cpu: number;
  disk_gb: number;
}

export interface IMe {
  name: string;
  admin: boolean;
  credits: number;
  quota: IQuota;
  usage: IUsage;
}

export interface IImage {
  name: string;
  kind: string;
  os_type: string;
  description: string;
  /** The image a VM gets when none is named (the panel preselects it). */
  default?: boolean;
}

/** What `POST twarga/api/vms` takes; omitted values take the server's defaults. */
export interface ICreateVM {
  name: string;
  image?: string;
  ram?: number;
  cpu?: number;
  disk?: number;
}

/** A VM snapshot, as `GET twarga/api/vms/{id}/snapshots` lists them (oldest first). */
export interface IVMSnapshot {
  name: string;
  /** When it was taken (ISO 8601, UTC). */
  created_at: string;
  /** The VM's libvirt state when it was taken: `running` (with memory) or `shutoff`. */
  state: string;
}
