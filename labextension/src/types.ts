/** The shapes the Twarga REST API answers with (see DESIGN.md, "API contract"). */

export type VMStatus =
  | 'pending'
  | 'starting'
  | 'running'
  | 'paused'
  | 'stopping'
  | 'stopped'
  | 'error'
  | 'unknown' // its host does not answer; reconciled when it is back
  | 'destroying';

export type VMAction = 'start' | 'stop' | 'restart' | 'destroy' | 'force-stop';

export interface IVM extends ILabVMFields {
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

/** What VMs of a lab add to the VM JSON (plain VMs: `lab_id` null or absent). */
export interface ILabVMFields {
  /** The lab the VM belongs to, or null for a plain VM. */
  lab_id?: number | null;
  lab_name?: string | null;
  /** The lab's machine this VM is an instance of, e.g. `attacker` or `node-2`. */
  machine?: string | null;
  /** The same, as the service's VM JSON names it. */
  lab_machine?: string | null;
  /** The VM's address on each of its lab's networks: `{lan: "10.77.0.11"}`. */
  addresses?: Record<string, string>;
  /** When the idle stop will stop this running VM if it stays idle (ISO 8601), or null. */
  idle_stop_at?: string | null;
}

export type LabStatus =
  'pending' | 'running' | 'stopped' | 'partial' | 'error' | 'destroyed';

export type LabAction = 'start' | 'stop' | 'destroy';

/** One of a lab's private networks (an L2 segment). */
export interface ILabNetwork {
  name: string;
  cidr: string;
}

/** A VM as the lab JSON lists it (the full VM is in `GET vms`). */
export interface ILabVM extends ILabVMFields {
  id: number;
  name: string;
  status: VMStatus;
  ssh_port?: number | null;
}

/** A lab, as `GET twarga/api/labs` lists them (see notes/labs-contract.md). */
export interface ILab {
  id: number;
  name: string;
  owner: string;
  template: string;
  status: LabStatus;
  deployment_id: number | null;
  created_at: string;
  networks: ILabNetwork[];
  vms: ILabVM[];
}

/** A lab template, as `GET twarga/api/lab-templates` lists them. */
export interface ILabTemplate {
  name: string;
  title?: string;
  description?: string;
  networks?: ILabNetwork[];
  machines?: { name: string; image: string; count?: number }[];
  machines_count?: number;
  vm_count?: number;
}

/** What `POST twarga/api/labs` takes. */
export interface ICreateLab {
  template: string;
  name: string;
}
