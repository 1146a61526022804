import { ILab, ILabVMFields, IMe, IVM, VMStatus } from './types';

/** "45s", "3m 05s", "2h 03m", "1d 02h". */
export function formatUptime(seconds: number): string {
  const s = Math.max(0, Math.floor(seconds));
  const pad = (n: number) => String(n).padStart(2, '0');
  if (s < 60) {
    return `${s}s`;
  }
  if (s < 3600) {
    return `${Math.floor(s / 60)}m ${pad(s % 60)}s`;
  }
  if (s < 86400) {
    return `${Math.floor(s / 3600)}h ${pad(Math.floor((s % 3600) / 60))}m`;
  }
  return `${Math.floor(s / 86400)}d ${pad(Math.floor((s % 86400) / 3600))}h`;
}

/** Credits as a person reads them: whole numbers plain, fractions to two places. */
export function formatCredits(credits: number): string {
  return String(Math.round(credits * 100) / 100);
}

/** "VMs 2/5 · RAM 1024/8192 MB" (plus CPU and disk when those have quotas). */
export function formatQuota(me: IMe): string {
  const { quota, usage } = me;
  const parts = [
    `VMs ${usage.vms}/${quota.max_vms}`,
    `RAM ${usage.ram_mb}/${quota.max_ram_mb} MB`
  ];
  if (quota.max_cpu !== null && quota.max_cpu !== undefined) {
    parts.push(`CPU ${usage.cpu}/${quota.max_cpu}`);
  }
  if (quota.max_disk_gb !== null && quota.max_disk_gb !== undefined) {
    parts.push(`Disk ${usage.disk_gb}/${quota.max_disk_gb} GB`);
  }
  return parts.join(' · ');
}

/** "512 MB · 1 CPU · 10 GB · twarga/tiny". */
export function formatSpec(vm: IVM): string {
  const cpus = vm.cpu === 1 ? '1 CPU' : `${vm.cpu} CPUs`;
  return `${vm.ram} MB · ${cpus} · ${vm.disk} GB · ${vm.image}`;
}

/**
 * Whether a VM's guest has booted, for a label next to its status: "ready", "booting"
 * (running, the guest has not reported in yet), or null when the VM is not running. A VM
 * without `ready` (a service from before it) is ready when running.
 */
export function readiness(vm: IVM): 'ready' | 'booting' | null {
  if (vm.status !== 'running') {
    return null;
  }
  return vm.ready === false ? 'booting' : 'ready';
}

/** "127.0.0.1:2222", or null when the VM has no SSH port. */
export function formatSSH(vm: IVM): string | null {
  if (!vm.ssh_port) {
    return null;
  }
  return `${vm.ssh_host ?? '127.0.0.1'}:${vm.ssh_port}`;
}

/** An ISO 8601 time as "2026-01-02 03:04:05" in the browser's time zone (as given if invalid). */
export function formatTimestamp(iso: string): string {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) {
    return iso;
  }
  const pad = (n: number) => String(n).padStart(2, '0');
  return (
    `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ` +
    `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`
  );
}

/** "14:05": an ISO 8601 time as hours and minutes in the browser's time zone (null if invalid). */
export function formatClock(iso: string): string | null {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) {
    return null;
  }
  const pad = (n: number) => String(n).padStart(2, '0');
  return `${pad(date.getHours())}:${pad(date.getMinutes())}`;
}

/**
 * "stops when idle at 14:05" for a running VM the idle stop has a time for; null when
 * it has none (not running, idle stop off, or a service from before it).
 */
export function formatIdleStop(vm: {
  status: VMStatus;
  idle_stop_at?: string | null;
}): string | null {
  if (vm.status !== 'running' || !vm.idle_stop_at) {
    return null;
  }
  const clock = formatClock(vm.idle_stop_at);
  return clock === null ? null : `stops when idle at ${clock}`;
}

/** "lan 10.77.0.11 · dmz 10.78.0.5": a lab VM's segment addresses ('' for none). */
export function formatAddresses(vm: ILabVMFields): string {
  return Object.entries(vm.addresses ?? {})
    .filter(([, address]) => !!address)
    .map(([network, address]) => `${network} ${address}`)
    .join(' · ');
}

/** "lan 10.77.0.0/24 · dmz 10.78.0.0/24": a lab's networks. */
export function formatNetworks(lab: ILab): string {
  return (lab.networks ?? [])
    .map(network => `${network.name} ${network.cidr}`)
    .join(' · ');
}
