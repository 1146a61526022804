import { Dialog, showDialog } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import {
  formatAddresses,
  formatCredits,
  formatIdleStop,
  formatNetworks,
  formatQuota,
  formatSpec,
  formatSSH,
  formatTimestamp,
  formatUptime,
  readiness
} from './format';
import { TwargaAPIError } from './handler';
import { TwargaModel } from './model';
import {
  ICreateVM,
  ILab,
  ILabVM,
  IVM,
  IVMSnapshot,
  LabAction,
  LabStatus,
  VMAction,
  VMStatus
} from './types';

/** The fields of the create form, in the order they are shown. */
const CREATE_FIELDS = ['name', 'image', 'ram', 'cpu', 'disk'] as const;
type CreateField = (typeof CREATE_FIELDS)[number];

/**
 * The buttons of a VM row. `console` is not an API action: it opens a tab; `snapshots`
 * shows (or hides) the VM's snapshots below the list.
 */
type RowAction =
  'start' | 'stop' | 'restart' | 'destroy' | 'console' | 'snapshots';
const ROW_ACTIONS: { action: RowAction; label: string; title: string }[] = [
  { action: 'start', label: 'Start', title: 'Start the VM' },
  { action: 'stop', label: 'Stop', title: 'Shut the VM down' },
  { action: 'restart', label: 'Restart', title: 'Reboot the VM' },
  { action: 'destroy', label: 'Destroy', title: 'Delete the VM and its disk' },
  {
    action: 'console',
    label: 'Console',
    title: "Open the VM's serial console in a tab"
  },
  {
    action: 'snapshots',
    label: 'Snapshots',
    title: "Show the VM's snapshots: take one, revert to one, delete one"
  }
];

/** The statuses in which a VM's snapshots can be taken, reverted to and deleted. */
const SNAPSHOT_READY: readonly VMStatus[] = [
  'running',
  'paused',
  'stopped',
  'error'
];

/** Which buttons make sense in which status. */
const ENABLED: Record<RowAction, readonly VMStatus[]> = {
  start: ['stopped', 'error'],
  stop: ['running', 'starting', 'paused'],
  restart: ['running'],
  destroy: [
    'pending',
    'starting',
    'running',
    'paused',
    'stopping',
    'stopped',
    'error'
  ],
  console: ['running'],
  snapshots: [
    'pending',
    'starting',
    'running',
    'paused',
    'stopping',
    'stopped',
    'error'
  ]
};

/** A lab's buttons and the lab statuses each makes sense in. */
const LAB_ACTIONS: {
  action: LabAction;
  label: string;
  title: string;
  enabled: readonly LabStatus[];
}[] = [
  {
    action: 'start',
    label: 'Start lab',
    title: 'Start every VM of the lab',
    enabled: ['stopped', 'partial', 'error']
  },
  {
    action: 'stop',
    label: 'Stop lab',
    title: 'Shut every VM of the lab down',
    enabled: ['running', 'partial', 'pending']
  },
  {
    action: 'destroy',
    label: 'Destroy lab',
    title: "Delete the lab's VMs, their disks and its networks",
    enabled: ['pending', 'running', 'stopped', 'partial', 'error']
  }
];

/**
 * A lab's VMs in the lab's order, each the full VM of `GET vms` when there is one (else
 * what the lab JSON says of it), with its segment addresses; then any VM of `vms` that
 * names this lab but the lab JSON does not list yet.
 */
export function labMembers(lab: ILab, vms: readonly IVM[]): IVM[] {
  const byId = new Map(vms.map(vm => [vm.id, vm]));
  const members = (lab.vms ?? []).map(member => {
    const full = byId.get(member.id);
    return full
      ? {
          ...full,
          lab_id: lab.id,
          lab_name: lab.name,
          machine:
            full.machine ??
            full.lab_machine ??
            member.machine ??
            member.lab_machine,
          addresses: full.addresses ?? member.addresses,
          idle_stop_at:
            full.idle_stop_at !== undefined
              ? full.idle_stop_at
              : member.idle_stop_at
        }
      : stubVM(lab, member);
  });
  const listed = new Set(members.map(vm => vm.id));
  for (const vm of vms) {
    if (vm.lab_id === lab.id && !listed.has(vm.id)) {
      members.push(vm);
    }
  }
  return members;
}

/**
 * My VMs split by lab: each lab with its VMs, and the plain VMs (no lab, or a lab the
 * labs list does not have) in the API's order.
 */
export function groupByLab(
  labs: readonly ILab[],
  vms: readonly IVM[]
): { labs: { lab: ILab; vms: IVM[] }[]; plain: IVM[] } {
  const grouped = labs.map(lab => ({ lab, vms: labMembers(lab, vms) }));
  const inLab = new Set<number>();
  for (const group of grouped) {
    group.vms.forEach(vm => inLab.add(vm.id));
  }
  return { labs: grouped, plain: vms.filter(vm => !inLab.has(vm.id)) };
}

/** A lab VM the VM list does not have yet, from what the lab JSON says of it. */
function stubVM(lab: ILab, member: ILabVM): IVM {
  return {
    owner: lab.owner,
    status_message: null,
    image: '',
    os_type: '',
    ram: 0,
    cpu: 0,
    disk: 0,
    ip_address: null,
    ssh_host: null,
    ssh_port: null,
    domain: null,
    created_at: lab.created_at,
    started_at: null,
    uptime: 0,
    ...member,
    lab_id: lab.id,
    lab_name: lab.name
  };
}

/**
 * The "Twarga Lab" side panel: my credits and quota, my VMs with their buttons, the
 * snapshots of the VM whose "Snapshots" button was pressed, and a form to create a VM.
 * Renders `TwargaModel`; every change goes through the model.
 */
export class TwargaPanel extends Widget {
  constructor(options: TwargaPanel.IOptions) {
    super();
    this._model = options.model;
    this._openConsole = options.openConsole;
    this._newLab = options.newLab ?? null;
    this.id = 'twarga-lab-panel';
    this.addClass('twarga-panel');
    this.title.caption = 'Twarga Lab';

    const header = element('div', 'twarga-header');
    header.appendChild(element('h2', 'twarga-title', 'Twarga Lab'));
    this._user = header.appendChild(element('span', 'twarga-user'));
    this.node.appendChild(header);

    const account = element('div', 'twarga-account');
    this._credits = account.appendChild(
      element('div', 'twarga-credits', 'Credits: …')
    );
    this._quota = account.appendChild(element('div', 'twarga-quota'));
    this.node.appendChild(account);

    this._serviceStatus = element('div', 'twarga-service-status');
    this._serviceStatus.setAttribute('role', 'status');
    this.node.appendChild(this._serviceStatus);

    const list = element('section', 'twarga-section');
    const listHead = list.appendChild(element('div', 'twarga-section-head'));
    listHead.appendChild(element('h3', 'twarga-section-title', 'My VMs'));
    if (this._newLab) {
      const newLab = element(
        'button',
        'jp-mod-styled twarga-button',
        'New lab…'
      ) as HTMLButtonElement;
      newLab.type = 'button';
      newLab.title =
        'Make a lab from a template: several VMs on private networks';
      newLab.dataset.action = 'new-lab';
      const open = this._newLab;
      newLab.addEventListener('click', () => open());
      listHead.appendChild(newLab);
    }
    this._empty = list.appendChild(element('div', 'twarga-empty', 'Loading…'));
    this._labList = list.appendChild(element('div', 'twarga-lab-list'));
    this._list = list.appendChild(element('div', 'twarga-vm-list'));
    this.node.appendChild(list);

    this._snapshots = new SnapshotSection(this._model, () =>
      this.selectVM(null)
    );
    this.node.appendChild(this._snapshots.node);

    this._form = this._buildForm();
    this.node.appendChild(this._form);

    this._model.changed.connect(this._render, this);
    this._render();
  }

  /** The VM whose snapshots are shown, or null. */
  get selectedVM(): number | null {
    return this._snapshots.vmId;
  }

  /** Show the snapshots of VM `id` (null: hide them). */
  selectVM(id: number | null): void {
    this._snapshots.vmId = id;
    void this._model.watchSnapshots(id);
    this._render();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._model.changed.disconnect(this._render, this);
    if (this._model.watchedVM === this._snapshots.vmId) {
      void this._model.watchSnapshots(null);
    }
    super.dispose();
  }

  private _render(): void {
    const model = this._model;
    const me = model.me;
    this.node.dataset.service = model.serviceError
      ? 'down'
      : model.loaded
        ? 'up'
        : 'loading';

    if (model.serviceError) {
      this._serviceStatus.textContent = `${model.serviceError} Retrying automatically…`;
      this._serviceStatus.hidden = false;
    } else {
      this._serviceStatus.textContent = '';
      this._serviceStatus.hidden = true;
    }

    if (me) {
      this._user.textContent = me.admin ? `${me.name} (admin)` : me.name;
      this._credits.textContent = `Credits: ${formatCredits(me.credits)}`;
      this._quota.textContent = formatQuota(me);
    }

    this._renderVMs();
    this._renderImages();
    this._snapshots.render();
  }

  private _renderVMs(): void {
    const { labs, plain } = groupByLab(this._model.labs, this._model.vms);
    const seen = new Set<number>();
    const seenLabs = new Set<number>();
    labs.forEach(({ lab, vms }, index) => {
      seenLabs.add(lab.id);
      let group = this._labs.get(lab.id);
      if (!group) {
        group = new LabGroup(
          lab,
          (action, g) => void this._onLabAction(action, g)
        );
        this._labs.set(lab.id, group);
      }
      group.update(lab);
      placeAt(this._labList, group.node, index);
      this._placeRows(group.vmList, vms, seen);
    });
    for (const [id, group] of this._labs) {
      if (!seenLabs.has(id)) {
        group.node.remove();
        this._labs.delete(id);
      }
    }
    this._placeRows(this._list, plain, seen);
    for (const [id, row] of this._rows) {
      if (!seen.has(id)) {
        row.node.remove();
        this._rows.delete(id);
      }
    }
    // A destroyed VM has no snapshots to show (only once the model has a VM list).
    const selected = this._snapshots.vmId;
    if (selected !== null && this._model.loaded && !seen.has(selected)) {
      this._snapshots.vmId = null;
      void this._model.watchSnapshots(null);
    }
    if (seen.size > 0 || labs.length > 0) {
      this._empty.hidden = true;
    } else {
      this._empty.hidden = false;
      this._empty.textContent = this._model.loaded
        ? 'No VMs yet: create one below.'
        : this._model.serviceError
          ? 'Your VMs will show here when Twarga Lab answers.'
          : 'Loading…';
    }
  }

  /** Show `vms` in `container`, in that order, reusing (and moving) their rows. */
  private _placeRows(
    container: HTMLElement,
    vms: readonly IVM[],
    seen: Set<number>
  ): void {
    vms.forEach((vm, index) => {
      seen.add(vm.id);
      let row = this._rows.get(vm.id);
      if (!row) {
        row = new VMRow(vm, (action, r) => void this._onRowAction(action, r));
        this._rows.set(vm.id, row);
      }
      row.update(vm);
      row.setSelected(vm.id === this._snapshots.vmId);
      // Keep DOM order equal to the API's order without rebuilding rows (a click in
      // flight on a rebuilt button would be lost).
      placeAt(container, row.node, index);
    });
    // Rows that moved away (a VM that joined a lab) are placed in their new container;
    // what is left after the last one here does not belong here any more.
    while (container.children.length > vms.length) {
      container.lastElementChild?.remove();
    }
  }

  private async _onLabAction(
    action: LabAction,
    group: LabGroup
  ): Promise<void> {
    const lab = group.lab;
    if (action === 'destroy') {
      const count = lab.vms?.length ?? 0;
      const answer = await showDialog({
        title: `Destroy lab ${lab.name}?`,
        body:
          `This deletes the lab "${lab.name}": its ${count === 1 ? 'VM' : `${count} VMs`}, ` +
          'their disks and its networks. It cannot be undone.',
        buttons: [
          Dialog.cancelButton(),
          Dialog.warnButton({ label: 'Destroy' })
        ]
      });
      if (!answer.button.accept) {
        return;
      }
    }
    group.setBusy(true);
    try {
      await this._model.actOnLab(lab.id, action);
      group.setError(null);
    } catch (error) {
      group.setError(messageOf(error));
    } finally {
      group.setBusy(false);
    }
  }

  private _renderImages(): void {
    const select = this._inputs.image as HTMLSelectElement;
    const names = this._model.images.map(image => image.name);
    const current = Array.from(select.options).map(option => option.value);
    if (names.length === 0 || names.join('\n') === current.join('\n')) {
      return;
    }
    const selected = select.value;
    select.replaceChildren(
      ...this._model.images.map(image => {
        const option = document.createElement('option');
        option.value = image.name;
        option.textContent = image.name;
        option.title = image.description;
        return option;
      })
    );
    const fallback = this._model.images.find(image => image.default)?.name;
    if (names.includes(selected)) {
      select.value = selected;
    } else if (fallback) {
      select.value = fallback;
    }
  }

  private async _onRowAction(action: RowAction, row: VMRow): Promise<void> {
    const vm = row.vm;
    if (action === 'console') {
      this._openConsole(vm);
      return;
    }
    if (action === 'snapshots') {
      this.selectVM(this._snapshots.vmId === vm.id ? null : vm.id);
      return;
    }
    if (action === 'destroy') {
      const answer = await showDialog({
        title: `Destroy ${vm.name}?`,
        body: `This deletes the VM "${vm.name}" and its disk. It cannot be undone.`,
        buttons: [
          Dialog.cancelButton(),
          Dialog.warnButton({ label: 'Destroy' })
        ]
      });
      if (!answer.button.accept) {
        return;
      }
    }
    row.setBusy(true);
    try {
      if (action === 'destroy') {
        await this._model.destroyVM(vm.id);
      } else {
        await this._model.act(vm.id, action as VMAction);
      }
      row.setError(null);
    } catch (error) {
      row.setError(messageOf(error));
    } finally {
      row.setBusy(false);
    }
  }

  private _buildForm(): HTMLFormElement {
    const form = element('form', 'twarga-create') as HTMLFormElement;
    form.noValidate = true;
    form.appendChild(element('h3', 'twarga-section-title', 'New VM'));

    const specs: Record<
      CreateField,
      { label: string; build: () => HTMLElement }
    > = {
      name: { label: 'Name', build: () => input('text', 'name', '', 'web-1') },
      image: { label: 'Image', build: () => document.createElement('select') },
      ram: { label: 'RAM (MB)', build: () => input('number', 'ram', '512') },
      cpu: { label: 'CPUs', build: () => input('number', 'cpu', '1') },
      disk: { label: 'Disk (GB)', build: () => input('number', 'disk', '10') }
    };
    for (const field of CREATE_FIELDS) {
      const spec = specs[field];
      const row = element('div', 'twarga-field');
      row.dataset.field = field;
      const control = spec.build() as HTMLInputElement | HTMLSelectElement;
      control.name = field;
      control.id = `twarga-create-${field}`;
      control.classList.add('jp-mod-styled', 'twarga-input');
      const label = element(
        'label',
        'twarga-label',
        spec.label
      ) as HTMLLabelElement;
      label.htmlFor = control.id;
      const error = element('div', 'twarga-field-error');
      error.dataset.field = field;
      error.hidden = true;
      row.append(label, control, error);
      form.appendChild(row);
      this._inputs[field] = control;
      this._fieldErrors[field] = error;
    }
    this._formError = form.appendChild(element('div', 'twarga-form-error'));
    this._formError.hidden = true;
    this._formStatus = form.appendChild(element('div', 'twarga-form-status'));

    const submit = element(
      'button',
      'jp-mod-styled jp-mod-accept twarga-button',
      'Create VM'
    );
    (submit as HTMLButtonElement).type = 'submit';
    submit.dataset.action = 'create';
    this._submit = form.appendChild(submit) as HTMLButtonElement;

    form.addEventListener('submit', event => {
      event.preventDefault();
      void this._create();
    });
    return form;
  }

  private async _create(): Promise<void> {
    this._clearFormErrors();
    const request = this._readForm();
    if (!request) {
      return;
    }
    this._submit.disabled = true;
    this._submit.textContent = 'Creating…';
    try {
      const vm = await this._model.createVM(request);
      this._formStatus.textContent = `${vm.name} was created: its status shows in the list above.`;
      (this._inputs.name as HTMLInputElement).value = '';
    } catch (error) {
      const field = fieldOf(error);
      if (field) {
        this._showFieldError(field, messageOf(error));
      } else {
        this._formError.textContent = messageOf(error);
        this._formError.hidden = false;
      }
    } finally {
      this._submit.disabled = false;
      this._submit.textContent = 'Create VM';
    }
  }

  /** The request the form describes, or null after showing what is wrong. */
  private _readForm(): ICreateVM | null {
    const name = (this._inputs.name as HTMLInputElement).value.trim();
    if (!name) {
      this._showFieldError('name', 'Give the VM a name, e.g. web-1.');
      return null;
    }
    const request: ICreateVM = { name };
    const image = (this._inputs.image as HTMLSelectElement).value;
    if (image) {
      request.image = image;
    }
    let ok = true;
    for (const field of ['ram', 'cpu', 'disk'] as const) {
      const raw = (this._inputs[field] as HTMLInputElement).value.trim();
      if (raw === '') {
        continue;
      }
      if (!/^\d+$/.test(raw)) {
        this._showFieldError(field, `${field} must be a whole number`);
        ok = false;
        continue;
      }
      request[field] = Number(raw);
    }
    return ok ? request : null;
  }

  private _showFieldError(field: CreateField, message: string): void {
    const error = this._fieldErrors[field];
    error.textContent = message;
    error.hidden = false;
    this._inputs[field].setAttribute('aria-invalid', 'true');
    this._inputs[field].focus();
  }

  private _clearFormErrors(): void {
    for (const field of CREATE_FIELDS) {
      this._fieldErrors[field].textContent = '';
      this._fieldErrors[field].hidden = true;
      this._inputs[field].removeAttribute('aria-invalid');
    }
    this._formError.textContent = '';
    this._formError.hidden = true;
    this._formStatus.textContent = '';
  }

  private _model: TwargaModel;
  private _openConsole: (vm: IVM) => void;
  private _newLab: (() => void) | null;
  private _labList: HTMLElement;
  private _labs = new Map<number, LabGroup>();
  private _user: HTMLElement;
  private _credits: HTMLElement;
  private _quota: HTMLElement;
  private _serviceStatus: HTMLElement;
  private _empty: HTMLElement;
  private _list: HTMLElement;
  private _snapshots: SnapshotSection;
  private _form: HTMLFormElement;
  private _formError!: HTMLElement;
  private _formStatus!: HTMLElement;
  private _submit!: HTMLButtonElement;
  private _inputs = {} as Record<
    CreateField,
    HTMLInputElement | HTMLSelectElement
  >;
  private _fieldErrors = {} as Record<CreateField, HTMLElement>;
  private _rows = new Map<number, VMRow>();
}

export namespace TwargaPanel {
  export interface IOptions {
    model: TwargaModel;
    /** Open the console tab of a VM. */
    openConsole: (vm: IVM) => void;
    /** Open the "new lab" dialog (no "New lab…" button without it). */
    newLab?: () => void;
  }
}

/**
 * One lab: a header with its name, status, template and networks (each with its cidr),
 * its start / stop / destroy buttons, and its VMs' rows under it.
 */
class LabGroup {
  constructor(
    lab: ILab,
    onAction: (action: LabAction, group: LabGroup) => void
  ) {
    this.lab = lab;
    this.node = element('div', 'twarga-lab');
    const head = this.node.appendChild(element('div', 'twarga-lab-head'));
    this._name = head.appendChild(element('span', 'twarga-lab-name'));
    this._status = head.appendChild(element('span', 'twarga-lab-status'));
    const details = this.node.appendChild(element('div', 'twarga-lab-details'));
    this._template = details.appendChild(
      element('span', 'twarga-lab-template')
    );
    this._networks = details.appendChild(
      element('span', 'twarga-lab-networks')
    );
    const actions = this.node.appendChild(element('div', 'twarga-lab-actions'));
    for (const { action, label, title } of LAB_ACTIONS) {
      const classes =
        action === 'destroy'
          ? 'jp-mod-styled jp-mod-warn twarga-button'
          : 'jp-mod-styled twarga-button';
      const button = element('button', classes, label) as HTMLButtonElement;
      button.type = 'button';
      button.title = title;
      button.dataset.labAction = action;
      button.addEventListener('click', () => onAction(action, this));
      actions.appendChild(button);
      this._buttons.set(action, button);
    }
    this._error = this.node.appendChild(element('div', 'twarga-lab-error'));
    this._error.setAttribute('role', 'alert');
    this._error.hidden = true;
    this.vmList = this.node.appendChild(element('div', 'twarga-lab-vms'));
  }

  readonly node: HTMLElement;
  /** Where the rows of the lab's VMs go. */
  readonly vmList: HTMLElement;
  lab: ILab;

  update(lab: ILab): void {
    this.lab = lab;
    this.node.dataset.labId = String(lab.id);
    this.node.dataset.labName = lab.name;
    this.node.dataset.status = lab.status;
    this._name.textContent = lab.name;
    this._status.textContent = lab.status;
    this._status.className = `twarga-lab-status twarga-status-${lab.status}`;
    this._template.textContent = `template ${lab.template}`;
    const networks = formatNetworks(lab);
    this._networks.textContent = networks ? `networks ${networks}` : '';
    this._networks.title = "The lab's private networks (no path to the host's)";
    this._refreshButtons();
  }

  setBusy(busy: boolean): void {
    this._busy = busy;
    this.node.classList.toggle('twarga-mod-busy', busy);
    this._refreshButtons();
  }

  setError(message: string | null): void {
    this._error.textContent = message ?? '';
    this._error.hidden = !message;
  }

  private _refreshButtons(): void {
    for (const { action, enabled } of LAB_ACTIONS) {
      const button = this._buttons.get(action);
      if (button) {
        button.disabled = this._busy || !enabled.includes(this.lab.status);
      }
    }
  }

  private _name: HTMLElement;
  private _status: HTMLElement;
  private _template: HTMLElement;
  private _networks: HTMLElement;
  private _error: HTMLElement;
  private _buttons = new Map<LabAction, HTMLButtonElement>();
  private _busy = false;
}

/** One VM in the list, built once and updated in place. */
class VMRow {
  constructor(vm: IVM, onAction: (action: RowAction, row: VMRow) => void) {
    this.vm = vm;
    this.node = element('div', 'twarga-vm');
    const head = this.node.appendChild(element('div', 'twarga-vm-head'));
    this._name = head.appendChild(element('span', 'twarga-vm-name'));
    const state = head.appendChild(element('span', 'twarga-vm-state'));
    this._status = state.appendChild(element('span', 'twarga-vm-status'));
    this._ready = state.appendChild(element('span', 'twarga-vm-ready'));
    this._ready.hidden = true;
    const details = this.node.appendChild(element('div', 'twarga-vm-details'));
    this._spec = details.appendChild(element('span', 'twarga-vm-spec'));
    this._uptime = details.appendChild(element('span', 'twarga-vm-uptime'));
    this._ssh = details.appendChild(element('span', 'twarga-vm-ssh'));
    this._addresses = this.node.appendChild(
      element('div', 'twarga-vm-addresses')
    );
    this._addresses.hidden = true;
    this._idle = this.node.appendChild(element('div', 'twarga-vm-idle'));
    this._idle.hidden = true;
    this._message = this.node.appendChild(element('div', 'twarga-vm-message'));
    this._error = this.node.appendChild(element('div', 'twarga-vm-error'));
    this._error.hidden = true;
    const actions = this.node.appendChild(element('div', 'twarga-vm-actions'));
    for (const { action, label, title } of ROW_ACTIONS) {
      const classes =
        action === 'destroy'
          ? 'jp-mod-styled jp-mod-warn twarga-button'
          : 'jp-mod-styled twarga-button';
      const button = element('button', classes, label) as HTMLButtonElement;
      button.type = 'button';
      button.title = title;
      button.dataset.action = action;
      button.addEventListener('click', () => onAction(action, this));
      actions.appendChild(button);
      this._buttons.set(action, button);
    }
  }

  readonly node: HTMLElement;
  vm: IVM;

  update(vm: IVM): void {
    this.vm = vm;
    this.node.dataset.vmId = String(vm.id);
    this.node.dataset.vmName = vm.name;
    this.node.dataset.status = vm.status;
    this._name.textContent = vm.name;
    this._status.textContent = vm.status;
    this._status.className = `twarga-vm-status twarga-status-${vm.status}`;
    this._updateReady(vm);
    // A lab VM the VM list does not have yet: its spec is not known.
    this._spec.textContent = vm.image ? formatSpec(vm) : '';
    this._uptime.textContent =
      vm.status === 'running' ? `up ${formatUptime(vm.uptime)}` : '';
    const ssh = formatSSH(vm);
    this._ssh.textContent = ssh ? `ssh ${ssh}` : '';
    const addresses = formatAddresses(vm);
    this._addresses.textContent = addresses;
    this._addresses.title = addresses
      ? "The VM's addresses on its lab's private networks"
      : '';
    this._addresses.hidden = !addresses;
    const idle = formatIdleStop(vm);
    this._idle.textContent = idle ?? '';
    this._idle.title = idle
      ? `No console input, no SSH session and low CPU until ${formatTimestamp(
          vm.idle_stop_at as string
        )}: the VM is stopped then (its credits stop running too)`
      : '';
    this._idle.hidden = idle === null;
    this._message.textContent = vm.status_message ?? '';
    this._message.hidden = !vm.status_message;
    this._refreshButtons();
  }

  setBusy(busy: boolean): void {
    this._busy = busy;
    this.node.classList.toggle('twarga-mod-busy', busy);
    this._refreshButtons();
  }

  setError(message: string | null): void {
    this._error.textContent = message ?? '';
    this._error.hidden = !message;
  }

  /** Whether this VM's snapshots are the ones shown. */
  setSelected(selected: boolean): void {
    this.node.classList.toggle('twarga-mod-selected', selected);
    this._buttons
      .get('snapshots')
      ?.setAttribute('aria-pressed', String(selected));
  }

  private _refreshButtons(): void {
    for (const [action, button] of this._buttons) {
      button.disabled = this._busy || !ENABLED[action].includes(this.vm.status);
    }
  }

  /** "booting…" or "ready" next to a running VM's status (the console works in both). */
  private _updateReady(vm: IVM): void {
    const ready = readiness(vm);
    this._ready.hidden = ready === null;
    if (ready === null) {
      delete this.node.dataset.ready;
      this._ready.textContent = '';
      this._ready.className = 'twarga-vm-ready';
      this._ready.title = '';
      return;
    }
    this.node.dataset.ready = String(ready === 'ready');
    this._ready.textContent = ready === 'ready' ? 'ready' : 'booting…';
    this._ready.className = `twarga-vm-ready twarga-ready-${ready}`;
    this._ready.title =
      ready === 'ready'
        ? 'The guest has booted: SSH and its services answer'
        : 'The VM runs, its guest is still starting: SSH may not answer yet ' +
          '(the console shows the boot)';
  }

  private _name: HTMLElement;
  private _status: HTMLElement;
  private _ready: HTMLElement;
  private _spec: HTMLElement;
  private _uptime: HTMLElement;
  private _ssh: HTMLElement;
  private _addresses: HTMLElement;
  private _idle: HTMLElement;
  private _message: HTMLElement;
  private _error: HTMLElement;
  private _buttons = new Map<RowAction, HTMLButtonElement>();
  private _busy = false;
}

/**
 * The snapshots of one VM: a list (name, when taken, state) with Revert and Delete per
 * snapshot, both confirmed in a dialog, and a form to take one. Errors of the service
 * show under the list, as the VM rows show theirs.
 */
class SnapshotSection {
  constructor(model: TwargaModel, onClose: () => void) {
    this._model = model;
    this.node = element('section', 'twarga-section twarga-snapshots');
    this.node.setAttribute('aria-label', 'Snapshots');
    const head = this.node.appendChild(element('div', 'twarga-snapshots-head'));
    this._title = head.appendChild(element('h3', 'twarga-section-title'));
    const close = element(
      'button',
      'jp-mod-styled twarga-button',
      'Hide'
    ) as HTMLButtonElement;
    close.type = 'button';
    close.title = 'Hide the snapshots';
    close.dataset.action = 'hide-snapshots';
    close.addEventListener('click', () => onClose());
    head.appendChild(close);
    this._empty = this.node.appendChild(
      element('div', 'twarga-empty twarga-snapshots-empty')
    );
    this._list = this.node.appendChild(element('div', 'twarga-snapshot-list'));

    const form = element('form', 'twarga-snapshot-take') as HTMLFormElement;
    form.noValidate = true;
    this._nameInput = input('text', 'snapshot-name', '', 'before-upgrade');
    this._nameInput.id = 'twarga-snapshot-name';
    this._nameInput.classList.add('jp-mod-styled', 'twarga-input');
    const label = element(
      'label',
      'twarga-label',
      'Snapshot name'
    ) as HTMLLabelElement;
    label.htmlFor = this._nameInput.id;
    this._take = element(
      'button',
      'jp-mod-styled jp-mod-accept twarga-button',
      'Take snapshot'
    ) as HTMLButtonElement;
    this._take.type = 'submit';
    this._take.dataset.action = 'take-snapshot';
    const row = element('div', 'twarga-snapshot-take-row');
    row.append(this._nameInput, this._take);
    form.append(label, row);
    form.addEventListener('submit', event => {
      event.preventDefault();
      void this._takeSnapshot();
    });
    this.node.appendChild(form);

    this._error = this.node.appendChild(
      element('div', 'twarga-snapshots-error')
    );
    this._error.setAttribute('role', 'alert');
    this._error.hidden = true;
    this._status = this.node.appendChild(
      element('div', 'twarga-snapshots-status')
    );
    this._status.setAttribute('role', 'status');
    this.node.hidden = true;
  }

  readonly node: HTMLElement;

  /** The VM whose snapshots are shown, or null (the section is then hidden). */
  get vmId(): number | null {
    return this._vmId;
  }
  set vmId(id: number | null) {
    if (id === this._vmId) {
      return;
    }
    this._vmId = id;
    this._rows.forEach(row => row.node.remove());
    this._rows.clear();
    this._showError(null);
    this._status.textContent = '';
    this._nameInput.value = '';
    this._nameInput.removeAttribute('aria-invalid');
  }

  render(): void {
    const vm = this._vm();
    this.node.hidden = vm === null;
    if (vm === null) {
      return;
    }
    this.node.dataset.vmId = String(vm.id);
    this.node.dataset.vmName = vm.name;
    this._title.textContent = `Snapshots of ${vm.name}`;
    const snapshots = this._model.snapshotsOf(vm.id);
    const listError = this._model.snapshotError(vm.id);
    const seen = new Set<string>();
    (snapshots ?? []).forEach((snapshot, index) => {
      seen.add(snapshot.name);
      let row = this._rows.get(snapshot.name);
      if (!row) {
        row = new SnapshotRow(
          snapshot,
          (action, r) => void this._onAction(action, r)
        );
        this._rows.set(snapshot.name, row);
      }
      row.update(snapshot);
      if (this._list.children[index] !== row.node) {
        this._list.insertBefore(row.node, this._list.children[index] ?? null);
      }
    });
    for (const [name, row] of this._rows) {
      if (!seen.has(name)) {
        row.node.remove();
        this._rows.delete(name);
      }
    }
    if (snapshots && snapshots.length > 0 && !listError) {
      this._empty.hidden = true;
    } else {
      this._empty.hidden = false;
      this._empty.textContent = listError
        ? `The snapshots cannot be listed: ${listError}`
        : snapshots
          ? 'No snapshots yet: take one below.'
          : 'Loading…';
    }
    this._ready = SNAPSHOT_READY.includes(vm.status);
    this._refreshButtons();
  }

  private _vm(): IVM | null {
    const id = this._vmId;
    return id === null
      ? null
      : (this._model.vms.find(vm => vm.id === id) ?? null);
  }

  private _refreshButtons(): void {
    const title = this._ready ? '' : 'Wait until the VM is running or stopped';
    this._take.disabled = this._busy || !this._ready;
    this._take.title = title || 'Take a snapshot of the disk (and memory)';
    for (const row of this._rows.values()) {
      row.setEnabled(!this._busy && this._ready, title);
    }
  }

  private _setBusy(busy: boolean): void {
    this._busy = busy;
    this.node.classList.toggle('twarga-mod-busy', busy);
    this._refreshButtons();
  }

  private _showError(message: string | null): void {
    this._error.textContent = message ?? '';
    this._error.hidden = !message;
  }

  private async _takeSnapshot(): Promise<void> {
    const vm = this._vm();
    if (!vm) {
      return;
    }
    this._showError(null);
    this._status.textContent = '';
    const name = this._nameInput.value.trim();
    if (!name) {
      this._nameInput.setAttribute('aria-invalid', 'true');
      this._showError('Give the snapshot a name, e.g. before-upgrade.');
      this._nameInput.focus();
      return;
    }
    this._nameInput.removeAttribute('aria-invalid');
    this._setBusy(true);
    this._take.textContent = 'Taking…';
    try {
      const snapshot = await this._model.takeSnapshot(vm.id, name);
      if (this._vmId === vm.id) {
        this._status.textContent = `Snapshot ${snapshot.name} of ${vm.name} was taken.`;
        this._nameInput.value = '';
      }
    } catch (error) {
      if (this._vmId === vm.id) {
        this._nameInput.setAttribute('aria-invalid', 'true');
        this._showError(messageOf(error));
      }
    } finally {
      this._take.textContent = 'Take snapshot';
      this._setBusy(false);
    }
  }

  private async _onAction(
    action: SnapshotAction,
    row: SnapshotRow
  ): Promise<void> {
    const vm = this._vm();
    if (!vm) {
      return;
    }
    const name = row.snapshot.name;
    const answer = await showDialog(
      action === 'revert'
        ? {
            title: `Revert ${vm.name} to ${name}?`,
            body:
              `${vm.name} goes back to snapshot "${name}" ` +
              `(${describeState(row.snapshot.state)}). ` +
              'What changed on it since then is lost.',
            buttons: [
              Dialog.cancelButton(),
              Dialog.warnButton({ label: 'Revert' })
            ]
          }
        : {
            title: `Delete snapshot ${name}?`,
            body: `This deletes snapshot "${name}" of ${vm.name}. It cannot be undone.`,
            buttons: [
              Dialog.cancelButton(),
              Dialog.warnButton({ label: 'Delete' })
            ]
          }
    );
    if (!answer.button.accept || this._vmId !== vm.id) {
      return;
    }
    this._showError(null);
    this._status.textContent = '';
    this._setBusy(true);
    try {
      if (action === 'revert') {
        const after = await this._model.revertSnapshot(vm.id, name);
        this._status.textContent = `${after.name} was reverted to ${name}: it is ${after.status}.`;
      } else {
        await this._model.deleteSnapshot(vm.id, name);
        this._status.textContent = `Snapshot ${name} of ${vm.name} was deleted.`;
      }
    } catch (error) {
      if (this._vmId === vm.id) {
        this._showError(messageOf(error));
      }
    } finally {
      this._setBusy(false);
    }
  }

  private _model: TwargaModel;
  private _vmId: number | null = null;
  private _title: HTMLElement;
  private _empty: HTMLElement;
  private _list: HTMLElement;
  private _nameInput: HTMLInputElement;
  private _take: HTMLButtonElement;
  private _error: HTMLElement;
  private _status: HTMLElement;
  private _rows = new Map<string, SnapshotRow>();
  private _busy = false;
  private _ready = false;
}

type SnapshotAction = 'revert' | 'delete';

/** One snapshot in the list, built once and updated in place. */
class SnapshotRow {
  constructor(
    snapshot: IVMSnapshot,
    onAction: (action: SnapshotAction, row: SnapshotRow) => void
  ) {
    this.snapshot = snapshot;
    this.node = element('div', 'twarga-snapshot');
    const head = this.node.appendChild(element('div', 'twarga-snapshot-head'));
    this._name = head.appendChild(element('span', 'twarga-snapshot-name'));
    this._state = head.appendChild(element('span', 'twarga-snapshot-state'));
    this._created = this.node.appendChild(
      element('div', 'twarga-snapshot-created')
    );
    const actions = this.node.appendChild(
      element('div', 'twarga-snapshot-actions')
    );
    const specs: { action: SnapshotAction; label: string; classes: string }[] =
      [
        {
          action: 'revert',
          label: 'Revert',
          classes: 'jp-mod-styled twarga-button'
        },
        {
          action: 'delete',
          label: 'Delete',
          classes: 'jp-mod-styled jp-mod-warn twarga-button'
        }
      ];
    for (const { action, label, classes } of specs) {
      const button = element('button', classes, label) as HTMLButtonElement;
      button.type = 'button';
      button.dataset.action = `${action}-snapshot`;
      button.addEventListener('click', () => onAction(action, this));
      actions.appendChild(button);
      this._buttons.set(action, button);
    }
  }

  readonly node: HTMLElement;
  snapshot: IVMSnapshot;

  update(snapshot: IVMSnapshot): void {
    this.snapshot = snapshot;
    this.node.dataset.snapshotName = snapshot.name;
    this.node.dataset.state = snapshot.state;
    this._name.textContent = snapshot.name;
    this._state.textContent = snapshot.state;
    this._state.title = describeState(snapshot.state);
    this._created.textContent = `taken ${formatTimestamp(snapshot.created_at)}`;
    this._created.title = snapshot.created_at;
  }

  setEnabled(enabled: boolean, why: string): void {
    for (const [action, button] of this._buttons) {
      button.disabled = !enabled;
      button.title =
        why ||
        (action === 'revert'
          ? `Go back to ${this.snapshot.name}`
          : `Delete ${this.snapshot.name}`);
    }
  }

  private _name: HTMLElement;
  private _state: HTMLElement;
  private _created: HTMLElement;
  private _buttons = new Map<SnapshotAction, HTMLButtonElement>();
}

/** What a snapshot's state means for a revert. */
function describeState(state: string): string {
  if (state === 'running') {
    return 'taken while it ran: disk and memory, the VM runs after a revert';
  }
  if (state === 'shutoff') {
    return 'taken while it was stopped: the disk only, the VM is stopped after a revert';
  }
  return `taken while it was ${state}`;
}

/** Put `node` at position `index` of `container` (moving it if it is elsewhere). */
function placeAt(
  container: HTMLElement,
  node: HTMLElement,
  index: number
): void {
  if (container.children[index] !== node) {
    container.insertBefore(node, container.children[index] ?? null);
  }
}

function element(tag: string, className: string, text?: string): HTMLElement {
  const node = document.createElement(tag);
  node.className = className;
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

function input(
  type: string,
  name: string,
  value: string,
  placeholder = ''
): HTMLInputElement {
  const node = document.createElement('input');
  node.type = type;
  node.name = name;
  node.value = value;
  node.placeholder = placeholder;
  node.autocomplete = 'off';
  node.spellcheck = false;
  return node;
}

function messageOf(error: unknown): string {
  if (error instanceof Error) {
    return error.message;
  }
  return String(error);
}

/** The form field an API error is about, if any. */
function fieldOf(error: unknown): CreateField | null {
  if (!(error instanceof TwargaAPIError)) {
    return null;
  }
  const known = (name: string | null | undefined): name is CreateField =>
    !!name && (CREATE_FIELDS as readonly string[]).includes(name);
  if (known(error.field)) {
    return error.field;
  }
  if (error.reason === 'name_taken') {
    return 'name';
  }
  // 400s name the key in quotes first: "'ram' must be an integer".
  const quoted = /^'([a-z_]+)'/.exec(error.message)?.[1];
  return error.status === 400 && known(quoted) ? quoted : null;
}
