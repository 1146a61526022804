import { Dialog } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import { TwargaModel } from './model';
import { ILab, ILabTemplate } from './types';

/** What a lab's name must look like (the service says the same when it refuses one). */
const LAB_NAME = /^[a-z][a-z0-9-]{0,30}$/;

/** Numbers the forms' element ids (two dialogs may be open one after the other). */
let nextFormId = 0;

/** The index of the "New lab" dialog's Create button. */
const CREATE_INDEX = 1;

/**
 * The body of the "New lab" dialog: the lab templates of `GET twarga/api/lab-templates`
 * (one radio button each: name, title, how many VMs, description) and the lab's name.
 * `create()` makes the lab (`POST twarga/api/labs {"template", "name"}`) and shows the
 * service's `message` when it refuses.
 */
export class NewLabForm extends Widget {
  constructor(options: NewLabForm.IOptions) {
    super({ node: document.createElement('form') });
    this._model = options.model;
    this.addClass('twarga-newlab');
    const form = this.node as HTMLFormElement;
    form.noValidate = true;
    // The dialog's Create button submits; Enter in the name field is the dialog's too.
    form.addEventListener('submit', event => event.preventDefault());

    form.appendChild(element('div', 'twarga-label', 'Template'));
    this._empty = form.appendChild(
      element('div', 'twarga-empty twarga-newlab-empty', 'Loading templates…')
    );
    this._list = form.appendChild(element('div', 'twarga-newlab-templates'));
    this._list.setAttribute('role', 'radiogroup');

    const label = element(
      'label',
      'twarga-label',
      'Lab name'
    ) as HTMLLabelElement;
    this._name = document.createElement('input');
    this._name.type = 'text';
    this._name.name = 'lab-name';
    this._name.id = `twarga-newlab-name-${nextFormId++}`;
    this._name.placeholder = 'my-lab';
    this._name.autocomplete = 'off';
    this._name.spellcheck = false;
    this._name.classList.add('jp-mod-styled', 'twarga-input');
    this._name.addEventListener('input', () => {
      this._nameTouched = this._name.value !== '';
    });
    label.htmlFor = this._name.id;
    form.append(label, this._name);

    this._error = form.appendChild(element('div', 'twarga-newlab-error'));
    this._error.setAttribute('role', 'alert');
    this._error.hidden = true;
    this._status = form.appendChild(element('div', 'twarga-newlab-status'));
    this._status.setAttribute('role', 'status');
  }

  /** The templates as last listed (empty until then). */
  get templates(): readonly ILabTemplate[] {
    return this._templates;
  }

  /** The chosen template's name, or '' for none. */
  get template(): string {
    const checked = this._list.querySelector<HTMLInputElement>(
      'input[name="lab-template"]:checked'
    );
    return checked?.value ?? '';
  }

  /** The lab this form made, or null. */
  get created(): ILab | null {
    return this._created;
  }

  /** The name field (focused when the dialog opens). */
  get nameInput(): HTMLInputElement {
    return this._name;
  }

  /** What the dialog resolves with: the lab made, or null. */
  getValue(): ILab | null {
    return this._created;
  }

  /** List the templates; resolves when they are shown (or why they cannot be). */
  async load(): Promise<void> {
    this._empty.hidden = false;
    this._empty.textContent = 'Loading templates…';
    let templates: ILabTemplate[];
    try {
      templates = await this._model.labTemplates();
    } catch (error) {
      this._empty.textContent = `The lab templates cannot be listed: ${messageOf(error)}`;
      return;
    }
    this._templates = templates;
    this._list.replaceChildren(
      ...templates.map((template, index) => this._option(template, index))
    );
    if (templates.length === 0) {
      this._empty.textContent = 'There are no lab templates on this server.';
      return;
    }
    this._empty.hidden = true;
    this._choose(templates[0].name);
  }

  /**
   * Make the lab the form describes. Resolves with it, or with null after showing what
   * is wrong (nothing chosen, a bad name, or the service's `message`).
   */
  async create(): Promise<ILab | null> {
    if (this._busy) {
      return null;
    }
    this._showError(null);
    this._status.textContent = '';
    const template = this.template;
    const name = this._name.value.trim();
    if (!template) {
      this._showError('Choose a template first.');
      return null;
    }
    if (!name) {
      this._showError('Give the lab a name, e.g. my-lab.');
      this._name.focus();
      return null;
    }
    if (!LAB_NAME.test(name)) {
      this._showError(
        'A lab name is lower-case letters, digits and dashes, starting with a letter.'
      );
      this._name.focus();
      return null;
    }
    this._setBusy(true);
    this._status.textContent = `Creating lab ${name}…`;
    try {
      const lab = await this._model.createLab({ template, name });
      this._created = lab;
      this._status.textContent =
        `Lab ${lab.name} is ${lab.status}: ` +
        'its VMs show in the Twarga Lab panel.';
      return lab;
    } catch (error) {
      this._status.textContent = '';
      this._showError(messageOf(error));
      return null;
    } finally {
      this._setBusy(false);
    }
  }

  /** Called with `true` while a lab is being made (the dialog disables its buttons). */
  onBusy: ((busy: boolean) => void) | null = null;

  private _option(template: ILabTemplate, index: number): HTMLElement {
    const option = element('label', 'twarga-newlab-template');
    option.dataset.template = template.name;
    const radio = document.createElement('input');
    radio.type = 'radio';
    radio.name = 'lab-template';
    radio.value = template.name;
    radio.id = `${this._name.id}-t${index}`;
    radio.addEventListener('change', () => this._choose(template.name));
    option.appendChild(radio);
    const text = option.appendChild(
      element('span', 'twarga-newlab-template-text')
    );
    text.appendChild(
      element('span', 'twarga-newlab-template-name', template.name)
    );
    if (template.title) {
      text.appendChild(
        element('span', 'twarga-newlab-template-title', ` — ${template.title}`)
      );
    }
    const count = template.vm_count ?? template.machines?.length;
    const networks = (template.networks ?? [])
      .map(network => `${network.name} ${network.cidr}`)
      .join(', ');
    const facts = [
      count === undefined ? '' : count === 1 ? '1 VM' : `${count} VMs`,
      networks
    ].filter(Boolean);
    if (facts.length) {
      text.appendChild(
        element(
          'span',
          'twarga-newlab-template-facts',
          ` (${facts.join('; ')})`
        )
      );
    }
    if (template.description) {
      option.title = template.description;
      option.appendChild(
        element(
          'div',
          'twarga-newlab-template-description',
          template.description
        )
      );
    }
    return option;
  }

  /** Check template `name`; the lab's name follows it until the user types one. */
  private _choose(name: string): void {
    for (const radio of Array.from(
      this._list.querySelectorAll<HTMLInputElement>(
        'input[name="lab-template"]'
      )
    )) {
      radio.checked = radio.value === name;
    }
    if (!this._nameTouched) {
      this._name.value = name;
    }
  }

  private _setBusy(busy: boolean): void {
    this._busy = busy;
    this._name.disabled = busy;
    this.onBusy?.(busy);
  }

  private _showError(message: string | null): void {
    this._error.textContent = message ?? '';
    this._error.hidden = !message;
    if (message) {
      this._name.setAttribute('aria-invalid', 'true');
    } else {
      this._name.removeAttribute('aria-invalid');
    }
  }

  private _model: TwargaModel;
  private _templates: ILabTemplate[] = [];
  private _list: HTMLElement;
  private _empty: HTMLElement;
  private _name: HTMLInputElement;
  private _nameTouched = false;
  private _error: HTMLElement;
  private _status: HTMLElement;
  private _created: ILab | null = null;
  private _busy = false;
}

export namespace NewLabForm {
  export interface IOptions {
    model: TwargaModel;
  }
}

/**
 * The "New lab" dialog: Create keeps it open until the lab is made (a refusal shows in
 * the form), Cancel closes it. Resolves with the lab made, or null.
 */
export class NewLabDialog extends Dialog<ILab | null> {
  constructor(options: NewLabDialog.IOptions) {
    const form = new NewLabForm({ model: options.model });
    super({
      title: 'New lab',
      body: form,
      buttons: [
        Dialog.cancelButton({ label: 'Close' }),
        Dialog.okButton({ label: 'Create lab' })
      ],
      defaultButton: CREATE_INDEX,
      focusNodeSelector: 'input[name="lab-name"]'
    });
    this.addClass('twarga-newlab-dialog');
    this.form = form;
    form.onBusy = busy => {
      for (const button of Array.from(
        this.node.querySelectorAll<HTMLButtonElement>(
          '.jp-Dialog-footer button'
        )
      )) {
        button.disabled = busy;
      }
    };
  }

  readonly form: NewLabForm;

  /** Create (the default button, or Enter) makes the lab and closes only when it is made. */
  resolve(index?: number): void {
    const chosen = index ?? CREATE_INDEX;
    if (chosen !== CREATE_INDEX) {
      super.resolve(chosen);
      return;
    }
    void this.form.create().then(lab => {
      if (lab && !this.isDisposed) {
        super.resolve(CREATE_INDEX);
      }
    });
  }

  /** Show the dialog, list the templates, and resolve with the lab made (or null). */
  static async open(options: NewLabDialog.IOptions): Promise<ILab | null> {
    // Disposed in the `finally` below, whichever way the dialog ends.
    // eslint-disable-next-line jupyter/require-disposable-ownership
    const dialog = new NewLabDialog(options);
    void dialog.form.load();
    try {
      const result = await dialog.launch();
      return result.button.accept ? result.value : null;
    } finally {
      dialog.dispose();
    }
  }
}

export namespace NewLabDialog {
  export interface IOptions {
    model: TwargaModel;
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

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
